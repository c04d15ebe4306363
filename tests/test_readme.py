"""The README's guide is code users copy: run it as written (on a per-test run dir)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_guide_runs(run_dir: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('run_dir = "/tmp/zbus-guide"', f'run_dir = "{run_dir}"')
    assert str(run_dir) in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme_guide"})
