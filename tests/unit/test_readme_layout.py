"""The README's Layout block names every room of the tree: each top-level folder, and each module of
handlers/, handlers/tasks/, handlers/preprocess/, handlers/video/, archiver_scripts/, autoscaler/, offline/
and benchmarks/.
A module added without a line there fails here (a simple name check, not a parse of the tree)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIRS = ["handlers", "handlers/tasks", "handlers/preprocess", "handlers/video", "archiver_scripts", "autoscaler",
               "offline", "offline/engines", "benchmarks"]


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n\n```\n(.*?)^```", readme, re.S | re.M)
    assert match, "README.md has no '## Layout' section with a code block"
    return match.group(1)


def tracked_top_level_dirs() -> set[str]:
    """Top-level folders git knows of (tracked files); ignored build output is not a room."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every folder on disk
        return {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in {".git", ".venv"}
                and not p.name.endswith((".egg-info", "_cache"))}
    return {line.split("/", 1)[0] for line in files.splitlines() if "/" in line}


def test_every_top_level_folder_is_in_the_layout():
    block = layout_block()
    missing = sorted(d for d in tracked_top_level_dirs() if f"{d}/" not in block)
    assert not missing, f"README Layout lacks these top-level folders: {missing}"


def test_every_module_is_in_the_layout():
    block = layout_block()
    missing = [f"{d}/{p.name}" for d in MODULE_DIRS for p in sorted((ROOT / d).glob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"(?<![\w.]){re.escape(p.name)}\b", block)]
    missing += [f"{d}/{p.name}/" for d in ("handlers", "handlers/preprocess", "offline") for p in sorted((ROOT / d).iterdir())
                if (p / "__init__.py").exists() and f"{p.name}/" not in block]
    assert not missing, f"README Layout lacks these modules: {missing}"
