"""Benchmarks are modules of the `benchmarks` package, run from the repository root with
`python -m benchmarks.NAME`: none edits sys.path to find the project, and the ones with a command
line parse `--help` that way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")


def sys_path_edits(path: Path) -> list[int]:
    """Lines that call sys.path.insert/append (code only: a string holding such a line is fine)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"]


def test_no_benchmark_edits_sys_path():
    edits = {p.name: lines for p in MODULES if (lines := sys_path_edits(p))}
    assert not edits, f"run benchmarks as modules (python -m benchmarks.NAME) instead: {edits}"


@pytest.mark.parametrize("name", ["serving", "gpu_check"])
def test_runs_as_a_module_from_the_repository_root(name):
    argv = [sys.executable, "-m", f"benchmarks.{name}"] + (["paths"] if name == "gpu_check" else ["--help"])
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
