import pytest

# The contract's assertions are in a module that is not a test module: have pytest explain their failures.
pytest.register_assert_rewrite("tests.stores.contract")
