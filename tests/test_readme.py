"""The README's guide is code users copy: run it as written (on a per-test run dir)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_guide_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    code = blocks[0]  # it makes (and removes) its own run directory
    exec(compile(code, str(README), "exec"), {"__name__": "readme_guide"})
