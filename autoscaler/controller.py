"""The control loop: scrape, decide, apply, export; survives whatever TorchServe does meanwhile.

Each tick reads the metrics address once and `GET /models/{name}` for each model of the policy,
asks `decide.assess` / `decide.allocate` for targets, and applies them with decreases first and
synchronously (the stopped workers are gone before any other model grows, so a device budget is
never exceeded, even between two calls), then increases by priority and asynchronously: TorchServe
answers at once and starts the workers in the background, the loop keeps ticking (a worker start
of seconds never stalls the decisions of the other models), and the starting workers already count
against the budget (TorchServe reports the count set, READY or not). What can go wrong is logged
and retried with a backoff, never raised out of `run`:

- TorchServe unreachable or restarting: the tick is skipped, retried after interval x 2^n (<= 30 s);
  counters that went backwards restart the model's window.
- key missing/expired/rotated: `torchserve.KeyFile` re-reads or renews it; if that fails, logged
  and retried like an unreachable server.
- a model of the policy not registered (or unregistered mid-run): logged once, skipped until it
  comes back; the other models carry on.
- a scale call that fails: logged, that model backs off (interval x 2^n, <= 5 min).
- a worker that cannot start (still not READY after settle_timeout_s): logged once, no scale-up of
  that model until its workers are READY; TorchServe keeps retrying the worker itself.
- metrics without the series the decisions read (TorchServe's default metrics_mode=log): the model
  is blind (`signals.BlindWatch`): an error naming the fix, tsgpu_autoscale_blind{model} 1, and its
  workers held (reason `blind`) rather than moved on counters that read 0 for want of data.

Each tick's decision is logged at DEBUG, and at INFO when it changes workers or differs from the
model's previous decision (a held decision under load is visible with --log-level DEBUG).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

from . import decide
from .decide import Decision, ModelState, Observation, Sample, Want
from .exporter import Registry
from .policy import ModelPolicy, Policy
from .signals import BlindWatch
from .torchserve import (
    AuthError,
    ManagementClient,
    ModelInfo,
    ModelNotFound,
    ScaleFailed,
    TorchServeError,
    Unreachable,
    gpu_memory_mb_by_pid,
    scrape_metrics,
)

log = logging.getLogger("tsgpu.autoscale")

MAX_TICK_BACKOFF_S = 30.0
MAX_MODEL_BACKOFF_S = 300.0
BACKOFF = "backoff"


class Controller:
    def __init__(
        self,
        policy: Policy,
        management: ManagementClient,
        metrics_url: str,
        dry_run: bool = False,
        registry: Registry | None = None,
        clock: Callable[[], float] = time.monotonic,
        scrape: Callable[[str], Mapping[str, Mapping[str, float]]] = scrape_metrics,
        gpu_memory: Callable[[], Mapping[int, Mapping[int, float]]] = gpu_memory_mb_by_pid,
    ) -> None:
        self.policy = policy
        self.management = management
        self.metrics_url = metrics_url
        self.dry_run = dry_run
        self.registry = registry or Registry()
        self.clock = clock
        self.scrape = scrape
        self.gpu_memory = gpu_memory
        self.states = {name: ModelState() for name in policy.models}
        self.missing: set[str] = set()
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.last_logged: dict[str, tuple[int, str]] = {}
        self.stalled: set[str] = set()  # models whose workers did not become READY in time
        self.blind = BlindWatch(self.registry, metrics_url)
        self.tick_failures = 0

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Tick every interval_s until `stop` is set (or forever); never raises out of a tick."""
        stop = stop or threading.Event()
        mode = " (dry run: decisions are printed, nothing is applied)" if self.dry_run else ""
        log.info("autoscaler started: %d models, interval %.1fs, management %s, metrics %s%s",
                 len(self.policy.models), self.policy.interval_s, self.management.url, self.metrics_url, mode)
        while not stop.is_set():
            started = self.clock()
            delay = self.policy.interval_s
            try:
                self.tick()
                self.tick_failures = 0
            except (Unreachable, AuthError, TorchServeError) as exc:
                delay = self._tick_failed(exc.kind, str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must not become a crash loop
                log.exception("autoscaler tick failed unexpectedly")
                delay = self._tick_failed("internal", f"{type(exc).__name__}: {exc}")
            stop.wait(max(0.0, delay - (self.clock() - started)))
        log.info("autoscaler stopped")

    def _tick_failed(self, kind: str, message: str) -> float:
        self.tick_failures += 1
        self.registry.inc("tsgpu_autoscale_errors_total", kind=kind)
        self.registry.set("tsgpu_autoscale_torchserve_up", 0)
        delay = min(MAX_TICK_BACKOFF_S, self.policy.interval_s * 2 ** (self.tick_failures - 1))
        log.warning("%s; nothing changed, retrying in %.1fs", message, delay)
        return delay

    # -- one tick ------------------------------------------------------------------------------

    def tick(self) -> dict[str, Decision]:
        now = self.clock()
        counters = self.scrape(self.metrics_url)
        infos = self._describe_all()
        self.registry.set("tsgpu_autoscale_torchserve_up", 1)
        self.registry.inc("tsgpu_autoscale_ticks_total")
        blind = self.blind.update(counters, infos, now)
        for name, info in infos.items():
            if name in blind:
                self.states[name] = ModelState()  # zeros read while blind are missing data, not load
                continue
            c = counters.get(name, {})
            sample = Sample(t=now, requests=c.get("ts_inference_requests_total", 0.0),
                            queue_us=c.get("ts_queue_latency_microseconds", 0.0),
                            latency_us=c.get("ts_inference_latency_microseconds", 0.0), pending=info.pending)
            self.states[name].observe(sample, self.policy.models[name].look_back_s)
        costs = self._measured_costs(infos)
        wants = {name: self._want(name, info, costs.get(name), now, name in blind) for name, info in infos.items()}
        decisions = decide.allocate(self.policy, wants, costs)
        applied = self._apply(decisions, infos)
        self._export(decisions, infos, applied)
        return decisions

    def _describe_all(self) -> dict[str, ModelInfo]:
        infos = {}
        for name in self.policy.models:
            try:
                infos[name] = self.management.describe(name)
            except ModelNotFound as exc:
                if name not in self.missing:
                    log.warning("%s; skipping it until it is registered (checked every tick)", exc)
                    self.registry.inc("tsgpu_autoscale_errors_total", kind=exc.kind)
                self.missing.add(name)
                self.states[name] = ModelState()
                self.blind.forget(name)
                self._clear_gauges(name)
                continue
            if name in self.missing:
                log.info("model %s is registered again: managing it", name)
                self.missing.discard(name)
        return infos

    def _want(self, name: str, info: ModelInfo, cost: float | None, now: float, blind: bool = False) -> Want:
        mp = self.policy.models[name]
        obs = Observation(workers=info.min_workers, ready=info.ready, batch_size=info.batch_size, memory_mb=cost)
        want = decide.assess(mp, obs, self.states[name], now)
        if blind and want.reason not in (decide.BELOW_MIN, decide.ABOVE_MAX):
            return Want(name, want.current, want.current, decide.BLIND)  # the policy's bounds need no load
        self._note_stalled(name, info, now)
        if now < self.retry_at.get(name, -math.inf) and want.want > want.current:
            return Want(name, want.current, want.current, BACKOFF, want.load, want.ratio)
        return want

    def _note_stalled(self, name: str, info: ModelInfo, now: float) -> None:
        since = self.states[name].starting_since
        timeout = self.policy.models[name].settle_timeout_s
        stalled = info.ready < info.min_workers and since is not None and now - since >= timeout
        if stalled and name not in self.stalled:
            self.registry.inc("tsgpu_autoscale_errors_total", kind="start_timeout")
            log.error("model %s: %d of %d workers READY after settle_timeout_s=%.0fs (a worker that cannot "
                      "start? see TorchServe's model_log.log); no scale-up of this model until they are",
                      name, info.ready, info.min_workers, timeout)
        if stalled:
            self.stalled.add(name)
        elif name in self.stalled:
            self.stalled.discard(name)
            log.info("model %s: all %d workers READY again", name, info.min_workers)

    def _measured_costs(self, infos: Mapping[str, ModelInfo]) -> dict[str, float | None]:
        """MB per worker on each model's device: RSS for cpu budgets, NVML for cuda:N budgets."""
        costs: dict[str, float | None] = {}
        gpu: Mapping[int, Mapping[int, float]] | None = None
        for name, info in infos.items():
            mp = self.policy.models[name]
            budget = self.policy.budgets.get(mp.device)
            if budget is None or budget.memory_mb is None:
                costs[name] = None
                continue
            if mp.device == "cpu":
                values = [w.memory_bytes / 2**20 for w in info.workers if w.memory_bytes]
            else:
                gpu = self.gpu_memory() if gpu is None else gpu
                per_pid = gpu.get(int(mp.device.split(":")[1]), {})
                values = [per_pid[w.pid] for w in info.workers if w.pid is not None and w.pid in per_pid]
            costs[name] = max(values) if values else None
        return costs

    # -- applying ------------------------------------------------------------------------------

    def _apply(self, decisions: Mapping[str, Decision], infos: Mapping[str, ModelInfo]) -> dict[str, int]:
        """Apply the changes; returns the worker count each model has been set to."""
        applied = {d.model: d.current for d in decisions.values()}
        for d in decisions.values():
            self._log_decision(d, infos[d.model])
        if self.dry_run:
            return applied
        downs = sorted((d for d in decisions.values() if d.target < d.current), key=lambda d: d.model)
        ups = sorted((d for d in decisions.values() if d.target > d.current),
                     key=lambda d: (-self.policy.models[d.model].priority, d.model))
        blocked: set[str] = set()  # devices where a decrease failed: increases there could overrun the budget
        for d in downs + ups:
            device = self.policy.models[d.model].device
            if d.target > d.current and device in blocked:
                log.warning("model %s: not scaling up to %d, a decrease on %s failed this tick", d.model, d.target, device)
                continue
            if self._scale(d):
                applied[d.model] = d.target
            elif d.target < d.current:
                blocked.add(device)
        return applied

    def _scale(self, d: Decision) -> bool:
        started = self.clock()
        try:
            # decreases wait (the budget is free before anything grows); increases do not
            message = self.management.scale(d.model, d.target, wait=d.target < d.current)
        except ModelNotFound as exc:
            log.warning("%s (unregistered mid-run?); skipping it", exc)
            self.missing.add(d.model)
            return False
        except ScaleFailed as exc:
            n = self.failures[d.model] = self.failures.get(d.model, 0) + 1
            delay = min(MAX_MODEL_BACKOFF_S, self.policy.interval_s * 2 ** n)
            self.retry_at[d.model] = self.clock() + delay
            self.states[d.model].changed(self.clock())
            self.registry.inc("tsgpu_autoscale_errors_total", kind=exc.kind)
            log.error("model %s: %s; TorchServe keeps retrying the worker, no scale-up of this model for %.0fs",
                      d.model, exc, delay)
            return False
        self.failures.pop(d.model, None)
        self.states[d.model].changed(self.clock())
        self.registry.inc("tsgpu_autoscale_decisions_total", model=d.model, reason=d.reason)
        log.info("model %s: applied %d -> %d in %.1fs (%s)", d.model, d.current, d.target, self.clock() - started, message)
        return True

    def _log_decision(self, d: Decision, info: ModelInfo) -> None:
        key = (d.target, d.reason)
        # every tick at DEBUG; at INFO what changes workers or differs from the previous tick
        level = logging.INFO if d.changes or self.last_logged.get(d.model) != key else logging.DEBUG
        self.last_logged[d.model] = key
        mp = self.policy.models[d.model]
        figures = d.load.describe() if d.load else "no load window yet"
        if d.reason == decide.BLIND:
            figures = f"no load: the metrics lack its series (see the error above); pending={info.pending}"
        ratio = "-" if d.ratio is None else f"{d.ratio:.2f}"
        prefix = "dry-run: would scale" if self.dry_run and d.changes else "decision:"
        log.log(level,
                "%s model=%s workers %d -> %d reason=%s want=%d ready=%d ratio=%s %s %s priority=%d range=[%d,%d]",
                prefix, d.model, d.current, d.target, d.reason, d.want, info.ready, ratio, _targets(mp),
                figures, mp.priority, mp.min_workers, mp.max_workers)

    # -- own metrics ---------------------------------------------------------------------------

    def _export(self, decisions: Mapping[str, Decision], infos: Mapping[str, ModelInfo],
                applied: Mapping[str, int]) -> None:
        r = self.registry
        for name, d in decisions.items():
            r.set("tsgpu_autoscale_workers", applied[name], model=name)
            r.set("tsgpu_autoscale_ready_workers", infos[name].ready, model=name)
            r.set("tsgpu_autoscale_wanted_workers", d.want, model=name)
            if d.load is not None:
                r.set("tsgpu_autoscale_request_rate", d.load.rate, model=name)
                r.set("tsgpu_autoscale_pending", d.load.pending, model=name)
                r.set("tsgpu_autoscale_queue_ms", d.load.queue_ms or 0.0, model=name)

    def _clear_gauges(self, name: str) -> None:
        for gauge in ("tsgpu_autoscale_workers", "tsgpu_autoscale_ready_workers", "tsgpu_autoscale_wanted_workers",
                      "tsgpu_autoscale_request_rate", "tsgpu_autoscale_pending", "tsgpu_autoscale_queue_ms"):
            self.registry.remove(gauge, model=name)


def _targets(mp: ModelPolicy) -> str:
    parts = []
    if mp.target_queue_ms is not None:
        parts.append(f"target_queue_ms={mp.target_queue_ms:g}")
    if mp.target_pending_per_worker is not None:
        parts.append(f"target_pending_per_worker={mp.target_pending_per_worker:g}")
    if mp.target_utilization is not None:
        parts.append(f"target_utilization={mp.target_utilization:g}")
    return " ".join(parts)
