"""Can the controller see the load? The series its decisions read, checked on every tick.

Every decision reads three TorchServe counters per model: ts_inference_requests_total (arrivals),
ts_queue_latency_microseconds (queue time) and ts_inference_latency_microseconds (requests in
flight). TorchServe exports them only with `metrics_mode=prometheus`. With its default (`log`) the
metrics address still answers 200, with an empty body (measured, TorchServe 0.12.0), so every
counter reads 0: an idle model, to a controller that does not look further. Acting on that holds
under any load, or scales a loaded model down. So a model is **blind** when

- the metrics answer lacks one of the three families (every model: TorchServe declares them in
  prometheus mode from its start, before any request), or
- the management API shows requests pending for a model that the metrics have never counted, on
  `EVIDENCE_TICKS` ticks in a row (ts_inference_requests_total counts a request when it arrives, so
  a queued request is always counted; one tick could be a request arriving between the two reads).

`BlindWatch` logs an ERROR that names the fix when a model becomes blind, again when requests
first queue for a blind model (load it cannot weigh), and every `repeat_s` while it stays blind;
an INFO when its series are back; and exports tsgpu_autoscale_blind{model} (1 blind, 0 seeing).
The controller holds a blind model's workers (reason `blind`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .exporter import Registry
from .torchserve import COUNTERS, ModelInfo, Scrape, metrics_endpoint

log = logging.getLogger("tsgpu.autoscale")

REQUIRED_SERIES = COUNTERS
METRICS_MODE_FIX = ("set metrics_mode=prometheus in config.properties (or TS_METRICS_MODE=prometheus in "
                    "torchserve's environment) and restart torchserve")
SAME_SERVER_FIX = ("point --metrics at the metrics address of the torchserve that --management manages, "
                   "with metrics_mode=prometheus in its config.properties")
REPEAT_S = 300.0
EVIDENCE_TICKS = 2


@dataclass(frozen=True)
class Blind:
    """Why the controller cannot see a model, and what fixes it."""

    reason: str
    fix: str


def missing_series(families: Collection[str] | None) -> list[str]:
    """The required series a scrape does not declare ([] when the scrape does not say: a fake)."""
    if families is None:
        return []
    return [name for name in REQUIRED_SERIES if name not in families]


def series_blind(missing: list[str], metrics_url: str) -> Blind:
    return Blind(f"the metrics at {metrics_endpoint(metrics_url)} lack {', '.join(missing)} (TorchServe exports "
                 "them only with metrics_mode=prometheus; its default, log, leaves the address empty)",
                 METRICS_MODE_FIX)


def uncounted_blind(metrics_url: str) -> Blind:
    return Blind(f"the management API shows requests pending that the metrics at "
                 f"{metrics_endpoint(metrics_url)} have never counted", SAME_SERVER_FIX)


class BlindWatch:
    """Which models the controller cannot see this tick; logs and exports it."""

    def __init__(self, registry: Registry, metrics_url: str, repeat_s: float = REPEAT_S) -> None:
        self.registry = registry
        self.metrics_url = metrics_url
        self.repeat_s = repeat_s
        self.blind: dict[str, Blind] = {}
        self.suspect: dict[str, int] = {}  # ticks in a row with pending requests the metrics never counted
        self.logged_at = -math.inf
        self.loaded_logged: set[str] = set()  # blind models with pending requests at the last error

    def update(self, scrape: Mapping[str, Mapping[str, float]], infos: Mapping[str, ModelInfo],
               now: float) -> dict[str, Blind]:
        """The blind models among `infos` (the registered ones), with their reasons."""
        families = scrape.families if isinstance(scrape, Scrape) else None
        missing = missing_series(families)
        blind: dict[str, Blind] = {}
        for name, info in infos.items():
            uncounted = info.pending > 0 and name not in scrape
            self.suspect[name] = self.suspect.get(name, 0) + 1 if uncounted else 0
            if missing:
                blind[name] = series_blind(missing, self.metrics_url)
            elif self.suspect[name] >= EVIDENCE_TICKS:
                blind[name] = uncounted_blind(self.metrics_url)
        self._report(blind, infos, now)
        return blind

    def forget(self, name: str) -> None:
        """The model is not registered (any more): nothing to see."""
        self.blind.pop(name, None)
        self.suspect.pop(name, None)
        self.registry.remove("tsgpu_autoscale_blind", model=name)

    def _report(self, blind: Mapping[str, Blind], infos: Mapping[str, ModelInfo], now: float) -> None:
        for name in infos:
            self.registry.set("tsgpu_autoscale_blind", 1 if name in blind else 0, model=name)
        for name in sorted(set(self.blind) - set(blind)):
            log.info("model %s: the metrics carry its series again: scaling it again", name)
        loaded = {name for name in blind if infos[name].pending > 0}
        if blind and (blind != self.blind or loaded - self.loaded_logged or now - self.logged_at >= self.repeat_s):
            self._log_blind(blind, infos)
            self.logged_at, self.loaded_logged = now, loaded
        self.blind = dict(blind)

    def _log_blind(self, blind: Mapping[str, Blind], infos: Mapping[str, ModelInfo]) -> None:
        by_reason: dict[Blind, list[str]] = {}
        for name, why in sorted(blind.items()):
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            pending = ", ".join(f"{n}={infos[n].pending}" for n in names if infos[n].pending)
            seen = f"; requests pending now, which it cannot weigh: {pending}" if pending else ""
            several = len(names) > 1
            log.error("autoscaler is blind for model%s %s: %s; holding %s workers as they are%s. Fix: %s",
                      "s" if several else "", ", ".join(names), why.reason, "their" if several else "its", seen,
                      why.fix)
