"""deploy/prometheus: rules are valid (promtool check rules) and compute what they claim (promtool test rules)."""

from __future__ import annotations

import subprocess

import yaml

from .conftest import DEPLOY, RULES


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules(promtool):
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests(promtool):
    result = _run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "tests" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_alert():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "rules_test.yml").read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert alerts - tested == set(), "alerts without a firing unit test"


def test_means_are_not_called_percentiles():
    """TorchServe 0.12 exports latency sums only: a rule built from them must not pose as a percentile."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record", "")
            if "p99" in name or "quantile" in name:
                assert "quantile_over_time" in rule["expr"], name
                assert "sampled" in name or "over_" in name, f"{name}: say what the p99 is taken over"
