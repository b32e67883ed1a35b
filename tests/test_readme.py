"""The README's code runs as a newcomer would run it: every Python block, in order, in one fresh folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"

RUN_TESTS = """
for _name, _fn in list(globals().items()):
    if _name.startswith("test_") and asyncio.iscoroutinefunction(_fn):
        asyncio.run(_fn())
        print("passed", _name)
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"^```sh\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands[:2] == ["make demo", "make test"]


def test_readme_code_runs_verbatim(tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + RUN_TESTS)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "OrderService: product 42 now costs 15" in result.stdout
    assert "passed test_discount_is_applied" in result.stdout
    assert "passed test_request_reply" in result.stdout
    assert "passed test_fulfilment_saga" in result.stdout
    assert "passed test_local_events" in result.stdout
    assert "passed test_a_database_per_tenant" in result.stdout
    assert (tmp_path / "product.db").exists()
