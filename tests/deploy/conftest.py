"""Shared helpers for the deployment tests: paths of deploy/ and the external tools they need."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "torchserve-gpu-handlers.json"
CHART = DEPLOY / "helm" / "torchserve-gpu-handlers"


def require_tool(name: str, package: str) -> str:
    """Path of an executable, or skip naming the package (`make test` installs it where it can)."""
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: install the Debian package '{package}' (make test does it when run as root)")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus", "prometheus")
