"""The README's code is real: every ```python block of "The main flows" runs, in order, as one script."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_the_main_flows():
    code = "\n".join(python_blocks())
    for name in ("no.fit", "prune.shrink", "quant.quantize_static", "quant.prepare_qat", "distill.Distiller"):
        assert name in code, f"README's main flows lost {name}"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the flows save a checkpoint in the working directory
    exec(compile("\n".join(python_blocks()), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.split()
    assert (tmp_path / "lenet5.npz").exists() and len(printed) >= 4
