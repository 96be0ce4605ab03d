"""deploy/grafana: the committed dashboard JSON is exactly what the generator writes, and covers the issue's panels."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from .conftest import DASHBOARD_JSON, DEPLOY, RULES


def _generator():
    pytest.importorskip("grafanalib", reason="pip install grafanalib (in the dev extra)")
    spec = importlib.util.spec_from_file_location("tsgpu_dashboard", DEPLOY / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_equals_generator_output():
    assert DASHBOARD_JSON.read_text() == _generator().render(), "run: python deploy/grafana/dashboard.py"


def test_check_mode_detects_a_stale_file(tmp_path):
    gen = _generator()
    stale = tmp_path / "d.json"
    stale.write_text(DASHBOARD_JSON.read_text().replace("Backbone", "Backbon"))
    assert gen.main(["--check", "--output", str(stale)]) == 1
    assert gen.main(["--check", "--output", str(DASHBOARD_JSON)]) == 0


def test_panels_cover_stages_errors_queue_workers_gpu():
    board = json.loads(DASHBOARD_JSON.read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for stage in ("fetch", "preprocess", "inference", "handler", "worker"):
        assert f'stage="{stage}"' in exprs
    for needle in ("code:ts_requests:ratio_rate1m", "model:tsgpu_request_errors", "model:ts_queue_depth",
                   "model:ts_workers_started", "gpu:dcgm_gpu_util", "gpu:dcgm_fb_used_bytes"):
        assert needle in exprs


def test_panels_only_query_defined_recording_rules():
    """A typo in a panel would show an empty graph in Grafana; every series name must be a rule."""
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    board = json.loads(DASHBOARD_JSON.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            name = target["expr"].split("{")[0].split(" ")[0]
            assert name in recorded, f"{panel['title']}: {name} is not a recording rule"
