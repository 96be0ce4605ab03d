"""CPU time of a process tree: what `tsgpu profile` and the serving benchmarks count as work done.

psutil is imported where used (it is a dependency of the tooling, not of the handlers).
"""

from __future__ import annotations

from typing import Any


def cpu_seconds() -> float:
    """CPU time of this process and its child processes (decode processes work outside our GIL)."""
    import psutil

    return tree_cpu_seconds(psutil.Process())


def tree_cpu_seconds(root: Any) -> float:
    """User + system CPU seconds of a psutil process and all its descendants (gone ones skipped)."""
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass  # exited meanwhile
    return total
