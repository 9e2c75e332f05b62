"""The README's Python examples run as written, in order, in one namespace.

Blocks fenced as ``python`` run here; snippets that need a launcher or a dataset (``torchrun``,
a Hugging Face ``Trainer``) are fenced as ``py`` and are covered by their own tests.
"""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_loops():
    code = "\n".join(python_blocks())
    assert "scaler.scale(loss).backward()" in code and "MixedPrecision(" in code


def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/readme/checkpoint.pt
    namespace: dict[str, object] = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "readme" / "checkpoint.pt").exists()
    assert namespace["report"].stepped  # type: ignore[attr-defined]
