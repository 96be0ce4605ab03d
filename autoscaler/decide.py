"""How many workers each model should have: pure functions of the policy, the samples and a clock.

One tick of the controller, for every model of the policy:

1. `ModelState.observe` keeps the counter samples of the look-back window (cumulative TorchServe
   counters; a counter going backwards means TorchServe restarted and the window starts again).
2. `window_load` turns the window into rates: arrivals per second, mean queue milliseconds per request
   (delta of ts_queue_latency_microseconds / delta of ts_inference_requests_total), mean pending
   requests, requests in flight (Little's law: delta of the latency sum / elapsed time) and requests
   in service (the same, latency minus queue time: how busy the workers are).
3. `assess` says what the model wants on its own, inside [min_workers, max_workers]:
   - over target: queue ms > target_queue_ms, or pending per ready worker > target_pending_per_worker,
     or (with `target_utilization`) the work per worker slot > target_utilization. The work is the
     requests in service, scaled by arrivals / completions over the window when the queue grows
     (saturated workers are busy 100% whatever the load; completions = arrivals - queue growth).
     After `upscale_delay_s` of being over, step up by max(1, ceil(workers x (ratio - 1))), at most
     doubling (fast up); with `target_utilization`, at least to the count the measured work needs
     at that utilization, ceil(work / (batchSize x target_utilization)), in one step.
   - under target (hysteresis): queue ms < downscale_below x target (default 0.5), pending per worker
     likewise, AND the load projected onto one worker fewer stays low (requests in flight per
     remaining worker < downscale_below x batchSize, and with `target_utilization` the work per
     remaining slot < target_utilization; to 0 workers: no arrivals at all). After
     `downscale_delay_s` of being under, step down by one (slow down).
   - between the two: hold, and both timers restart. After any change the window restarts, so the
     samples taken with the old worker count never drive the next step. While workers are starting
     (READY < set) nothing moves (`settling`) and the window starts again when they are READY, so
     the queue that built up during the start does not count as load on the new count. Workers
     that are still not READY after `settle_timeout_s` (a worker that cannot start) block further
     scale-ups of that model (`start_timeout`); it may still scale down.
4. `allocate` fits the wants into each device's budget by priority: higher priority first, each model
   keeps at least min_workers, equal priorities share round-robin. A higher priority can take workers
   from a lower one down to its min_workers, never the reverse.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .policy import Budget, ModelPolicy, Policy

# reasons (also the `reason` label of tsgpu_autoscale_decisions_total)
SCALE_UP = "scale_up"
SCALE_DOWN = "scale_down"
SCALE_FROM_ZERO = "scale_from_zero"
BELOW_MIN = "below_min"
ABOVE_MAX = "above_max"
PREEMPTED = "preempted"          # a higher-priority model needs this model's share of the budget
BUDGET_CAPPED = "budget_capped"  # wanted more; the budget (held by higher or equal priority) says no
COST_UNKNOWN = "cost_unknown"    # memory budget, but no declared or measured per-worker memory yet
HOLD = "hold"
SETTLING = "settling"
START_TIMEOUT = "start_timeout"  # workers set but not READY after settle_timeout_s: no scale-up
NO_DATA = "no_data"
BLIND = "blind"  # the metrics lack the series the decision reads (autoscaler/signals.py): hold


@dataclass(frozen=True)
class Sample:
    """Cumulative counters and gauges of one model at time `t` (seconds, any monotonic clock)."""

    t: float
    requests: float    # ts_inference_requests_total: arrivals, 503 answers included
    queue_us: float    # ts_queue_latency_microseconds (sum over answered requests)
    latency_us: float  # ts_inference_latency_microseconds (sum, queue included)
    pending: int       # jobQueueStatus.pendingRequests


@dataclass(frozen=True)
class Observation:
    """What TorchServe says about one model at one tick."""

    workers: int                 # the count TorchServe maintains (minWorkers)
    ready: int                   # workers in READY state
    batch_size: int = 1
    memory_mb: float | None = None  # measured per-worker cost on the model's device (max over workers)


@dataclass(frozen=True)
class Load:
    window_s: float
    rate: float               # requests arriving per second
    queue_ms: float | None    # mean queue latency per request; None when nothing arrived
    pending: float            # mean pending requests over the window
    in_flight: float          # mean requests inside TorchServe (queued + running)
    busy: float = 0.0         # mean requests in service (in a worker, not queued)
    demand: float = 0.0       # requests in service the arrivals would keep busy (busy x arrivals / completions)

    def describe(self) -> str:
        queue = "-" if self.queue_ms is None else f"{self.queue_ms:.1f}"
        return (f"rate={self.rate:.2f}/s queue_ms={queue} pending={self.pending:.1f} "
                f"in_flight={self.in_flight:.2f} busy={self.busy:.2f} demand={self.demand:.2f} "
                f"window={self.window_s:.1f}s")


@dataclass
class ModelState:
    """What the controller remembers about a model between ticks."""

    samples: deque[Sample] = field(default_factory=deque)
    over_since: float | None = None
    under_since: float | None = None
    last_change: float = -math.inf
    window_start: float = -math.inf  # no sample before this counts (last change, or workers READY)
    starting_since: float | None = None  # when READY < set was first seen (None: all READY)

    def observe(self, sample: Sample, look_back_s: float) -> None:
        if self.samples and _went_back(self.samples[-1], sample):
            self.samples.clear()  # counters reset: TorchServe restarted
        self.samples.append(sample)
        start = max(sample.t - look_back_s, self.window_start)
        # keep one sample at or before the window start as the baseline for the deltas
        while len(self.samples) > 1 and self.samples[1].t <= start:
            self.samples.popleft()

    def changed(self, now: float) -> None:
        """Workers were changed at `now`: start the window and the timers again."""
        self.last_change = now
        self.restart_window(now)

    def restart_window(self, now: float) -> None:
        """Forget the timers and the samples before `now`, but the newest one at or before `now`: it is
        the next window's baseline. The controller calls this after a scale call returns, later than
        the tick's sample; dropping that sample too would lose the arrivals between it and the next
        tick (a model parked at 0 workers would miss the first request it answered 503)."""
        self.window_start = now
        self.over_since = self.under_since = None
        while len(self.samples) > 1 and self.samples[1].t <= now:
            self.samples.popleft()


def _went_back(old: Sample, new: Sample) -> bool:
    return new.requests < old.requests or new.queue_us < old.queue_us or new.latency_us < old.latency_us


def window_load(samples: Sequence[Sample]) -> Load | None:
    """Rates over the window; None until it holds two samples."""
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    dt = last.t - first.t
    if dt <= 0:
        return None
    arrived = last.requests - first.requests
    queue_ms = (last.queue_us - first.queue_us) / arrived / 1000.0 if arrived > 0 else None
    pending = sum(s.pending for s in list(samples)[1:]) / (len(samples) - 1)
    in_flight = max(0.0, (last.latency_us - first.latency_us) / dt / 1e6)
    serving_us = (last.latency_us - last.queue_us) - (first.latency_us - first.queue_us)
    busy = min(in_flight, max(0.0, serving_us / dt / 1e6))
    # Saturated workers show busy = their count whatever the load: scale it by arrivals / completions
    # (completions = arrivals - growth of the pending queue), completions counted as at least a tenth.
    completed = max(arrived - (last.pending - first.pending), arrived / 10.0)
    demand = busy * arrived / completed if arrived > 0 else busy
    return Load(window_s=dt, rate=arrived / dt, queue_ms=queue_ms, pending=pending, in_flight=in_flight,
                busy=busy, demand=demand)


@dataclass(frozen=True)
class Want:
    """What one model wants on its own (inside [min, max], before the budget)."""

    model: str
    current: int
    want: int
    reason: str
    load: Load | None = None
    ratio: float | None = None  # load / target (the larger of the queue and pending ratios)


def load_ratio(mp: ModelPolicy, load: Load, ready: int) -> float:
    """How far over its latency targets the model is (1.0 = at target; 0.0 without such targets)."""
    ratios = [0.0]
    if mp.target_queue_ms is not None:
        ratios.append((load.queue_ms or 0.0) / mp.target_queue_ms)
    if mp.target_pending_per_worker is not None:
        ratios.append(load.pending / max(ready, 1) / mp.target_pending_per_worker)
    return max(ratios)


def utilization_ratio(mp: ModelPolicy, load: Load, workers: int, batch_size: int) -> float | None:
    """Requests in service per worker slot over target_utilization (1.0 = at target); None when off."""
    if mp.target_utilization is None:
        return None
    return load.demand / (max(workers, 1) * max(batch_size, 1)) / mp.target_utilization


def needed_workers(mp: ModelPolicy, load: Load, batch_size: int) -> int:
    """Workers that serve the measured work at target_utilization (0 without that key)."""
    if mp.target_utilization is None:
        return 0
    return math.ceil(load.demand / (max(batch_size, 1) * mp.target_utilization) - 1e-9)


def _under(mp: ModelPolicy, load: Load, ratio: float, current: int, batch_size: int) -> bool:
    if ratio >= mp.downscale_below:
        return False
    if current - 1 <= 0:
        return load.rate == 0 and load.pending == 0  # to zero workers only when idle
    fewer = utilization_ratio(mp, load, current - 1, batch_size)
    if fewer is not None and fewer >= 1.0:
        return False  # one worker fewer would be over target_utilization: it would scale up again
    return load.in_flight / (current - 1) < mp.downscale_below * max(batch_size, 1)


def assess(mp: ModelPolicy, obs: Observation, state: ModelState, now: float) -> Want:
    """One model's wish for this tick; updates the timers in `state`."""
    current = obs.workers
    if current < mp.min_workers:
        return Want(mp.name, current, mp.min_workers, BELOW_MIN)
    if current > mp.max_workers:
        return Want(mp.name, current, mp.max_workers, ABOVE_MAX)
    load = window_load(state.samples)
    if current == 0:
        state.starting_since = None
        return _from_zero(mp, state, load)
    if obs.ready < current:
        state.starting_since = now if state.starting_since is None else state.starting_since
        if now - state.starting_since < mp.settle_timeout_s:
            # measure the new worker count from when it is READY, not the backlog of its start
            state.restart_window(now)
            return Want(mp.name, current, current, SETTLING, load)
        want = _assess_load(mp, obs, state, now, load)
        if want.want > current:  # more workers would not start either
            state.over_since = None
            return Want(mp.name, current, current, START_TIMEOUT, want.load, want.ratio)
        return want
    if state.starting_since is not None:  # all READY since this tick: measure from here
        state.starting_since = None
        state.restart_window(now)
        load = window_load(state.samples)
    return _assess_load(mp, obs, state, now, load)


def _assess_load(mp: ModelPolicy, obs: Observation, state: ModelState, now: float, load: Load | None) -> Want:
    current = obs.workers
    if load is None:
        state.over_since = state.under_since = None
        return Want(mp.name, current, current, NO_DATA)
    ratio = load_ratio(mp, load, obs.ready)
    busy_ratio = utilization_ratio(mp, load, current, obs.batch_size)
    overall = max(ratio, busy_ratio or 0.0)  # latency targets and target_utilization together
    if overall > 1.0:
        state.under_since = None
        state.over_since = now if state.over_since is None else state.over_since
        if now - state.over_since >= mp.upscale_delay_s and current < mp.max_workers:
            step = max(1, math.ceil(current * (min(ratio, 2.0) - 1.0)))
            want = max(current + step, needed_workers(mp, load, obs.batch_size))
            return Want(mp.name, current, min(mp.max_workers, want), SCALE_UP, load, overall)
    elif _under(mp, load, ratio, current, obs.batch_size):
        state.over_since = None
        state.under_since = now if state.under_since is None else state.under_since
        if now - state.under_since >= mp.downscale_delay_s and current > mp.min_workers:
            return Want(mp.name, current, current - 1, SCALE_DOWN, load, overall)
    else:
        state.over_since = state.under_since = None
    return Want(mp.name, current, current, HOLD, load, overall)


def _from_zero(mp: ModelPolicy, state: ModelState, load: Load | None) -> Want:
    # At 0 workers TorchServe answers 503 at once, but still counts the request in
    # ts_inference_requests_total: any arrival in the window is the signal.
    arrived = load is not None and (load.rate > 0 or load.pending > 0)
    if mp.scale_from_zero and arrived:
        return Want(mp.name, 0, max(1, mp.min_workers), SCALE_FROM_ZERO, load)
    return Want(mp.name, 0, 0, HOLD, load)


@dataclass(frozen=True)
class Decision:
    model: str
    current: int
    target: int
    want: int
    reason: str
    load: Load | None = None
    ratio: float | None = None

    @property
    def changes(self) -> bool:
        return self.target != self.current


def allocate(
    policy: Policy,
    wants: Mapping[str, Want],
    costs: Mapping[str, float | None] | None = None,
) -> dict[str, Decision]:
    """Fit every model's want into its device budget, by priority. `costs`: MB per worker (None: unknown)."""
    costs = dict(costs or {})
    targets: dict[str, int] = {}
    unknown: set[str] = set()
    for device in {policy.models[name].device for name in wants}:
        names = [n for n in wants if policy.models[n].device == device]
        budget = policy.budgets.get(device)
        if budget is None:
            targets.update({n: wants[n].want for n in names})
        else:
            grant, no_cost = _fit_device(policy, budget, names, wants, costs)
            targets.update(grant)
            unknown |= no_cost
    return {name: _decision(wants[name], targets[name], name in unknown) for name in wants}


def _decision(want: Want, target: int, cost_unknown: bool = False) -> Decision:
    reason = want.reason
    if target < want.want:
        if cost_unknown and target >= want.current:
            reason = COST_UNKNOWN
        else:
            reason = PREEMPTED if target < want.current else BUDGET_CAPPED
    return Decision(want.model, want.current, target, want.want, reason, want.load, want.ratio)


def _fit_device(policy: Policy, budget: Budget, names: list[str], wants: Mapping[str, Want],
                costs: dict[str, float | None]) -> tuple[dict[str, int], set[str]]:
    mps = {n: policy.models[n] for n in names}
    cost = _costs_for(budget, mps, costs)
    grant = {n: mps[n].min_workers for n in names}  # every model keeps its minimum
    used_workers = sum(grant.values())
    used_mb = sum(grant[n] * (cost[n] or 0.0) for n in names)

    def fits(name: str) -> bool:
        if budget.workers is not None and used_workers + 1 > budget.workers:
            return False
        if budget.memory_mb is not None:
            mb = cost[name]
            if mb is None:
                return False
            return used_mb + mb <= budget.memory_mb + 1e-9
        return True

    for priority in sorted({mps[n].priority for n in names}, reverse=True):
        group = sorted(n for n in names if mps[n].priority == priority)
        # first what each already has (never more than it wants), then growth, round-robin
        for ceiling in ({n: min(wants[n].want, wants[n].current) for n in group},
                        {n: _growth_ceiling(wants[n], cost[n], budget) for n in group}):
            progress = True
            while progress:
                progress = False
                for n in group:
                    if grant[n] < ceiling[n] and fits(n):
                        grant[n] += 1
                        used_workers += 1
                        used_mb += cost[n] or 0.0
                        progress = True
    return grant, {n for n in names if budget.memory_mb is not None and cost[n] is None}


def _growth_ceiling(want: Want, cost: float | None, budget: Budget) -> int:
    if budget.memory_mb is not None and cost is None:
        return min(want.want, want.current)  # cannot prove a new worker fits: keep what it has
    return want.want


def _costs_for(budget: Budget, mps: Mapping[str, ModelPolicy], measured: Mapping[str, float | None]) -> dict[str, float | None]:
    """Declared memory_mb wins; else measured; else the largest known cost on the device."""
    if budget.memory_mb is None:
        return {n: None for n in mps}
    cost = {n: mps[n].memory_mb or measured.get(n) for n in mps}
    known = [c for c in cost.values() if c]
    fallback = max(known) if known else None
    return {n: c if c else fallback for n, c in cost.items()}
