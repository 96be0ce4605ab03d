"""`tsgpu autoscale --check`: verify the whole set-up once, one line per check, exit 1 on any FAIL.

Checks, in order: the policy file, the key file, the management address (reachable, key accepted),
the metrics address (reachable), the metrics mode (the series the decisions read are there: see
`autoscaler.signals`), and every model of the policy (registered, its requests counted). A FAIL line
says what was found and the fix. The models are checked only once the management address answers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .policy import Policy, PolicyError, load_policy
from .signals import METRICS_MODE_FIX, REQUIRED_SERIES, SAME_SERVER_FIX, missing_series, series_blind, uncounted_blind
from .torchserve import (
    AuthError,
    KeyFile,
    ManagementClient,
    ModelNotFound,
    Scrape,
    TorchServeError,
    Unreachable,
    metrics_endpoint,
    scrape_metrics,
)

KEY_FILE_FIX = ("pass --key-file with the key_file.json torchserve wrote in the directory it was started from "
                "(a new one at each start; deleted when it stops)")

ScrapeFn = Callable[[str], Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f". Fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}{fix}"


def run_checks(policy_path: Path, management: ManagementClient, metrics_url: str,
               scrape: ScrapeFn = scrape_metrics) -> list[Check]:
    """Every check of the set-up, in order; never raises for what it checks."""
    policy, checks = check_policy(policy_path)
    key_check = check_key_file(management.keys)
    checks.append(key_check)
    if not key_check.ok:  # still tell whether the address answers at all, without the unusable key
        management = ManagementClient(management.url, KeyFile(None), timeout=management.timeout)
    registered, management_check = check_management(management)
    checks.append(management_check)
    scraped, metrics_check = check_metrics(metrics_url, scrape)
    checks.append(metrics_check)
    if scraped is not None:
        checks.append(check_metrics_mode(scraped, metrics_url))
    if policy is not None and registered is not None:
        checks += [check_model(name, management, registered, scraped, metrics_url) for name in policy.models]
    return checks


def check_policy(path: Path) -> tuple[Policy | None, list[Check]]:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return None, [Check("policy", False, str(exc), "correct the policy file (docs/autoscaling.md, Policy keys)")]
    return policy, [Check("policy", True, f"{path}: {len(policy.models)} models, interval {policy.interval_s:g}s")]


def check_key_file(keys: KeyFile) -> Check:
    if keys.path is None:
        return Check("key file", True, "none given (fine while torchserve runs with token authorization off; "
                                       "the management check says whether it asks for a key)")
    try:
        keys.management_key()
    except AuthError as exc:
        return Check("key file", False, str(exc), KEY_FILE_FIX)
    return Check("key file", True, f"{keys.path}: management key read")


def check_management(management: ManagementClient) -> tuple[list[str] | None, Check]:
    name = f"management {management.url}"
    try:
        registered = management.list_models()
    except Unreachable as exc:
        return None, Check(name, False, str(exc), "start torchserve, or pass --management with its "
                                                  "management_address from config.properties")
    except AuthError as exc:
        return None, Check(name, False, str(exc), KEY_FILE_FIX)
    except TorchServeError as exc:
        return None, Check(name, False, str(exc))
    keyed = f", answered with the management key from {management.keys.path}" if management.keys.enabled else ""
    count = f"{len(registered)} model{'' if len(registered) == 1 else 's'} registered"
    return registered, Check(name, True, f"reachable{keyed}; {count}")


def check_metrics(metrics_url: str, scrape: ScrapeFn) -> tuple[Mapping[str, Mapping[str, float]] | None, Check]:
    name = f"metrics {metrics_endpoint(metrics_url)}"
    try:
        scraped = scrape(metrics_url)
    except Unreachable as exc:
        return None, Check(name, False, str(exc), "pass --metrics with torchserve's metrics_address from "
                                                  "config.properties (enable_metrics_api=false turns it off)")
    except TorchServeError as exc:
        return None, Check(name, False, str(exc), METRICS_MODE_FIX)
    return scraped, Check(name, True, "reachable")


def check_metrics_mode(scraped: Mapping[str, Mapping[str, float]], metrics_url: str) -> Check:
    missing = missing_series(scraped.families if isinstance(scraped, Scrape) else None)
    if missing:
        return Check("metrics mode", False, series_blind(missing, metrics_url).reason, METRICS_MODE_FIX)
    return Check("metrics mode", True, f"prometheus: {', '.join(REQUIRED_SERIES)} present")


def check_model(name: str, management: ManagementClient, registered: list[str],
                scraped: Mapping[str, Mapping[str, float]] | None, metrics_url: str) -> Check:
    label = f"model {name}"
    not_registered = Check(label, False, f"not registered in torchserve at {management.url} (registered: "
                                         f"{', '.join(sorted(registered)) or 'none'})",
                           "correct its name under models: in the policy, or register it (its .mar in the "
                           "model store and in load_models of config.properties)")
    if name not in registered:
        return not_registered
    try:
        info = management.describe(name)
    except ModelNotFound:
        return not_registered
    except TorchServeError as exc:
        return Check(label, False, str(exc))
    counted = scraped is None or name in scraped or bool(missing_series(getattr(scraped, "families", None)))
    if info.pending > 0 and not counted:  # (metrics without the series at all: the metrics mode check says so)
        return Check(label, False, f"{info.pending} requests pending; {uncounted_blind(metrics_url).reason}",
                     SAME_SERVER_FIX)
    return Check(label, True, f"registered, {info.ready} of {info.min_workers} workers READY")


def report(checks: list[Check], out: TextIO | None = None) -> int:
    """Print the checks (to stdout by default) and a summary; 0 when all passed, else 1."""
    out = out or sys.stdout
    for check in checks:
        print(check.line(), file=out)
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks passed" + (f", {failed} FAILED" if failed else ""),
          file=out)
    return 1 if failed else 0
