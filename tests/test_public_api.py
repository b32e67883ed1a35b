"""The public face of `eventrelay`: a sorted `__all__` naming exactly what `__init__` offers (httpx style)."""

from __future__ import annotations
import __future__

import subprocess
import sys
import types

import pytest

import eventrelay


def public_members() -> set[str]:
    """What `eventrelay/__init__.py` makes public: every name without an underscore, except submodules
    (importing `eventrelay.bus` binds `bus` on the package) and `from __future__ import annotations`."""
    return {
        name
        for name, value in vars(eventrelay).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)
    }


def test_all_is_sorted_without_duplicates() -> None:
    assert eventrelay.__all__ == sorted(set(eventrelay.__all__))


def test_nothing_public_is_missing_from_all() -> None:
    assert public_members() - set(eventrelay.__all__) == set()


def test_all_names_only_what_exists() -> None:
    assert set(eventrelay.__all__) - public_members() == set()


@pytest.mark.parametrize("name", eventrelay.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from eventrelay import {name}", namespace)
    assert namespace[name] is getattr(eventrelay, name)
    assert getattr(namespace[name], "__module__", "eventrelay").startswith("eventrelay")


def test_star_import_gives_all_and_nothing_else() -> None:
    namespace: dict[str, object] = {}
    exec("from eventrelay import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(eventrelay.__all__)


def test_importing_eventrelay_loads_no_optional_extra() -> None:
    """The face is light: the clients of brokers and databases, and Prometheus, load only when used
    (OpenTelemetry, when installed, is picked up at import: see `eventrelay.tracing`)."""
    extras = ["aio_pika", "aiokafka", "asyncmy", "asyncpg", "nats", "prometheus_client", "redis"]
    code = f"import sys, eventrelay; print(sorted(m for m in {extras!r} if m in sys.modules))"

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert done.stdout.strip() == "[]"
