"""A priority autoscaler for a stock TorchServe: scales each model's workers through the management API.

    tsgpu autoscale --policy POLICY.yaml [--management URL] [--metrics URL] [--key-file PATH] [--dry-run|--check]

Rooms: `policy` (the YAML, validated), `decide` (pure decisions: windows, hysteresis, budgets by
priority), `torchserve` (management/metrics clients, token keys), `signals` (whether the metrics
carry the series the decisions read: blind models), `controller` (the loop and its robustness),
`exporter` (its own Prometheus metrics), `check` (`--check`: the set-up verified once), `main` (the
command line). See docs/autoscaling.md.
"""

from .policy import Budget, ModelPolicy, Policy, PolicyError, load_policy, parse_policy

__all__ = ["Budget", "ModelPolicy", "Policy", "PolicyError", "load_policy", "parse_policy"]
