"""The autoscaling policy file: parsed and validated into frozen dataclasses.

    interval_s: 2
    budgets:                  # what the workers of a device may use together
      cpu: {workers: 3}       # and/or, per GPU: cuda:0: {memory_mb: 70000}
    models:
      search-embed: {priority: 10, min_workers: 1, max_workers: 3, target_queue_ms: 50}
      batch-tagging: {priority: 1, min_workers: 1, max_workers: 3, target_queue_ms: 2000}

Every error names the key path (`models.search-embed.max_workers`), the value received and what to
write instead. Nothing here talks to TorchServe: see `decide.py` for what the numbers mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from handlers.errors import ConfigError

DEVICE = re.compile(r"^(cpu|cuda:\d+)$")

# Defaults in the spirit of Ray Serve's autoscaler: react fast to load, give capacity back slowly.
DEFAULT_INTERVAL_S = 2.0
DEFAULT_UPSCALE_DELAY_S = 4.0
DEFAULT_DOWNSCALE_DELAY_S = 60.0
DEFAULT_LOOK_BACK_S = 10.0
DEFAULT_DOWNSCALE_BELOW = 0.5
DEFAULT_SETTLE_TIMEOUT_S = 120.0

_TOP_KEYS = {"interval_s", "budgets", "models"}
_BUDGET_KEYS = {"workers", "memory_mb"}
_MODEL_KEYS = {
    "priority", "min_workers", "max_workers", "target_queue_ms", "target_pending_per_worker",
    "upscale_delay_s", "downscale_delay_s", "look_back_s", "downscale_below", "memory_mb", "device",
    "scale_from_zero", "settle_timeout_s", "target_utilization",
}


class PolicyError(ConfigError):
    """The policy file is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Budget:
    """What all workers placed on one device may use together (None: not limited)."""

    device: str
    workers: int | None = None
    memory_mb: float | None = None


@dataclass(frozen=True)
class ModelPolicy:
    name: str
    min_workers: int
    max_workers: int
    target_queue_ms: float | None
    priority: int = 0
    target_pending_per_worker: float | None = None
    upscale_delay_s: float = DEFAULT_UPSCALE_DELAY_S
    downscale_delay_s: float = DEFAULT_DOWNSCALE_DELAY_S
    look_back_s: float = DEFAULT_LOOK_BACK_S
    downscale_below: float = DEFAULT_DOWNSCALE_BELOW
    memory_mb: float | None = None
    device: str = "cpu"
    scale_from_zero: bool = False
    settle_timeout_s: float = DEFAULT_SETTLE_TIMEOUT_S
    target_utilization: float | None = None


@dataclass(frozen=True)
class Policy:
    interval_s: float = DEFAULT_INTERVAL_S
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    models: Mapping[str, ModelPolicy] = field(default_factory=dict)

    def on_device(self, device: str) -> list[ModelPolicy]:
        return [m for m in self.models.values() if m.device == device]


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy YAML file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"policy file {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path}: not valid YAML ({exc})") from None
    try:
        return parse_policy(data)
    except PolicyError as exc:
        raise PolicyError(f"policy file {path}: {exc}") from None


def parse_policy(data: object) -> Policy:
    """Validate a policy mapping (as loaded from YAML)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"expected a mapping with keys {sorted(_TOP_KEYS)}, got {type(data).__name__}")
    _no_unknown(data, _TOP_KEYS, "")
    interval = _number(data, "interval_s", "", DEFAULT_INTERVAL_S, minimum=0.1)
    budgets = _budgets(data.get("budgets") or {})
    raw_models = data.get("models")
    if not isinstance(raw_models, Mapping) or not raw_models:
        raise PolicyError("models: required, a mapping of model name -> settings, e.g. "
                          "models: {my-model: {min_workers: 1, max_workers: 2, target_queue_ms: 100}}")
    default_device = next(iter(budgets)) if len(budgets) == 1 else "cpu"
    models = {str(name): _model(str(name), spec, default_device) for name, spec in raw_models.items()}
    policy = Policy(interval_s=interval, budgets=budgets, models=models)
    _check_budgets_fit_minimums(policy)
    return policy


def _budgets(raw: object) -> dict[str, Budget]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"budgets: expected a mapping of device -> limits, got {raw!r}")
    budgets = {}
    for device, spec in raw.items():
        device = str(device)
        where = f"budgets.{device}"
        if not DEVICE.match(device):
            raise PolicyError(f"{where}: device must be 'cpu' or 'cuda:N' (e.g. cuda:0), got {device!r}")
        if not isinstance(spec, Mapping) or not spec:
            raise PolicyError(f"{where}: expected {{workers: N}} and/or {{memory_mb: N}}, got {spec!r}")
        _no_unknown(spec, _BUDGET_KEYS, where)
        workers = _integer(spec, "workers", where, None, minimum=0)
        memory = _number(spec, "memory_mb", where, None, minimum=1)
        budgets[device] = Budget(device=device, workers=workers, memory_mb=memory)
    return budgets


def _model(name: str, spec: object, default_device: str) -> ModelPolicy:
    where = f"models.{name}"
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{where}: expected a mapping of settings, got {spec!r}")
    _no_unknown(spec, _MODEL_KEYS, where)
    min_workers = _integer(spec, "min_workers", where, 1, minimum=0)
    max_workers = _integer(spec, "max_workers", where, None, minimum=1)
    if max_workers is None:
        raise PolicyError(f"{where}.max_workers: required (the most workers this model may have)")
    if max_workers < min_workers:
        raise PolicyError(f"{where}.max_workers: {max_workers} is below min_workers {min_workers}")
    target_queue = _number(spec, "target_queue_ms", where, None, minimum=0.001)
    target_pending = _number(spec, "target_pending_per_worker", where, None, minimum=0.001)
    utilization = _number(spec, "target_utilization", where, None, minimum=0.01)
    if utilization is not None and utilization > 1.0:
        raise PolicyError(f"{where}.target_utilization: a fraction of the workers' time busy, at most 1.0 "
                          f"(e.g. 0.5 keeps half of the capacity spare), got {utilization!r}")
    if target_queue is None and target_pending is None and utilization is None:
        raise PolicyError(f"{where}: set target_queue_ms (mean queue latency to keep under, in ms) "
                          "and/or target_pending_per_worker and/or target_utilization")
    device = str(spec.get("device", default_device))
    if not DEVICE.match(device):
        raise PolicyError(f"{where}.device: must be 'cpu' or 'cuda:N', got {device!r}")
    scale_from_zero = spec.get("scale_from_zero", False)
    if not isinstance(scale_from_zero, bool):
        raise PolicyError(f"{where}.scale_from_zero: expected true or false, got {scale_from_zero!r}")
    if scale_from_zero and min_workers > 0:
        raise PolicyError(f"{where}.scale_from_zero: only meaningful with min_workers: 0 "
                          f"(min_workers is {min_workers}); remove it or set min_workers: 0")
    below = _number(spec, "downscale_below", where, DEFAULT_DOWNSCALE_BELOW, minimum=0.0)
    if below >= 1.0:
        raise PolicyError(f"{where}.downscale_below: must be below 1.0 (a fraction of the target), got {below}")
    return ModelPolicy(
        name=name, min_workers=min_workers, max_workers=max_workers, target_queue_ms=target_queue,
        priority=_integer(spec, "priority", where, 0, minimum=None),
        target_pending_per_worker=target_pending,
        upscale_delay_s=_number(spec, "upscale_delay_s", where, DEFAULT_UPSCALE_DELAY_S, minimum=0.0),
        downscale_delay_s=_number(spec, "downscale_delay_s", where, DEFAULT_DOWNSCALE_DELAY_S, minimum=0.0),
        look_back_s=_number(spec, "look_back_s", where, DEFAULT_LOOK_BACK_S, minimum=0.1),
        downscale_below=below,
        memory_mb=_number(spec, "memory_mb", where, None, minimum=1),
        device=device, scale_from_zero=scale_from_zero,
        settle_timeout_s=_number(spec, "settle_timeout_s", where, DEFAULT_SETTLE_TIMEOUT_S, minimum=1.0),
        target_utilization=utilization,
    )


def _check_budgets_fit_minimums(policy: Policy) -> None:
    for device, budget in policy.budgets.items():
        models = policy.on_device(device)
        floor = sum(m.min_workers for m in models)
        if budget.workers is not None and floor > budget.workers:
            raise PolicyError(f"budgets.{device}.workers: {budget.workers} cannot hold the min_workers of its "
                              f"models ({floor} in all): raise the budget or lower min_workers")
        if budget.memory_mb is not None:
            declared = sum(m.min_workers * m.memory_mb for m in models if m.memory_mb)
            if declared > budget.memory_mb:
                raise PolicyError(f"budgets.{device}.memory_mb: {budget.memory_mb:g} cannot hold min_workers x "
                                  f"memory_mb of its models ({declared:g} MB): raise it or lower min_workers")


def _no_unknown(spec: Mapping, allowed: set[str], where: str) -> None:
    for key in spec:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise PolicyError(f"{path}: unknown key (expected one of: {', '.join(sorted(allowed))})")


@overload
def _number(spec: Mapping[str, Any], key: str, where: str, default: float, minimum: float | None) -> float: ...
@overload
def _number(spec: Mapping[str, Any], key: str, where: str, default: None, minimum: float | None) -> float | None: ...
def _number(spec: Mapping[str, Any], key: str, where: str, default: float | None, minimum: float | None) -> float | None:
    path = f"{where}.{key}" if where else key
    if key not in spec or spec[key] is None:
        return default
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(f"{path}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise PolicyError(f"{path}: must be >= {minimum:g}, got {value!r}")
    return float(value)


@overload
def _integer(spec: Mapping[str, Any], key: str, where: str, default: int, minimum: int | None) -> int: ...
@overload
def _integer(spec: Mapping[str, Any], key: str, where: str, default: None, minimum: int | None) -> int | None: ...
def _integer(spec: Mapping[str, Any], key: str, where: str, default: int | None, minimum: int | None) -> int | None:
    path = f"{where}.{key}" if where else key
    if key not in spec or spec[key] is None:
        return default
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{path}: expected a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise PolicyError(f"{path}: must be >= {minimum}, got {value!r}")
    return value
