"""`pip install .` gives the `sparselearning` library, usable from any directory, and installs nothing else.

The install goes into a fresh target directory with this environment's pip, offline (no build isolation, no
dependencies), from a copy of the files the build reads, so the checkout gets no build/ or *.egg-info. The loop
example of the README (the same code as the ``Masking`` docstring) then runs in an interpreter whose only extra path
is that target directory.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

import sparselearning


def loop_example(text: str) -> str:
    """The first Python block that imports Masking from sparselearning: a fenced README block or a docstring ``::``
    block, dedented."""
    fenced = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    indented = re.findall(r"::\n\n((?:(?: {8}.*)?\n)+)", text)
    blocks = [textwrap.dedent(block) for block in fenced + indented]
    return next(block for block in blocks if "from sparselearning import Masking" in block).strip() + "\n"


def test_readme_loop_example_is_the_masking_docstring_example() -> None:
    readme = loop_example((ROOT / "README.md").read_text())
    assert readme == loop_example(sparselearning.Masking.__doc__)
    assert "masking = Masking(model, optimizer" in readme and "masking.step(step)" in readme


@pytest.mark.slow
def test_pip_install_gives_only_sparselearning_and_the_readme_loop_runs(tmp_path: Path) -> None:
    source, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "sparselearning", source / "sparselearning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    installed = {p.name for p in target.iterdir()}
    assert "sparselearning" in installed
    assert not installed & {"models", "interop", "datasets", "main.py", "engine.py", "benchmarks", "training", "tests"}, installed
    assert not [p for p in installed if p != "sparselearning" and not p.endswith(".dist-info")], installed

    check = textwrap.dedent(f"""
        import importlib.util, sys
        assert {str(ROOT)!r} not in sys.path and importlib.util.find_spec("models") is None, sys.path
        assert sparselearning_file().startswith({str(target)!r}), sparselearning_file()
        masks = masking.state_dict()["masks"]
        weights = dict(model.named_parameters())
        active = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs(active / total - 0.5) < 0.01, active / total
        assert all(int(weights[name][~m].count_nonzero()) == 0 for name, m in masks.items())
        print("ok", active, total)
    """)
    script = (loop_example((ROOT / "README.md").read_text())
              + "def sparselearning_file():\n    import sparselearning\n    return sparselearning.__file__\n" + check)
    (elsewhere / "loop.py").write_text(script)
    # -P: neither the script's directory nor the working directory goes on sys.path; PYTHONPATH is the target only
    proc = subprocess.run([sys.executable, "-P", "-s", "loop.py"], cwd=elsewhere,
                          env={**env, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("ok "), proc.stdout[-500:]
