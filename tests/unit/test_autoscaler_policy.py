"""The autoscaler's policy and decisions with a fake clock and fake metrics (no TorchServe)."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from autoscaler import decide
from autoscaler.controller import Controller
from autoscaler.decide import ModelState, Observation, Sample
from autoscaler.exporter import Registry
from autoscaler.policy import PolicyError, load_policy, parse_policy
from autoscaler.torchserve import (
    KeyFile,
    ManagementClient,
    ModelInfo,
    ModelNotFound,
    ScaleFailed,
    Unreachable,
    WorkerInfo,
    model_counters,
)

ISSUE_POLICY = """
interval_s: 2
budgets:                 # what the workers of a device may use together
  cpu: {workers: 3}      # and/or, per GPU: cuda:0: {memory_mb: 70000}
models:
  search-embed: {priority: 10, min_workers: 1, max_workers: 3, target_queue_ms: 50}
  batch-tagging: {priority: 1, min_workers: 1, max_workers: 3, target_queue_ms: 2000}
"""


def policy(budget: dict | None = None, **models: dict):
    return parse_policy({"interval_s": 1, "budgets": budget or {}, "models": models})


def model(**kw) -> dict:
    spec = {"min_workers": 1, "max_workers": 3, "target_queue_ms": 100, "upscale_delay_s": 2,
            "downscale_delay_s": 5, "look_back_s": 3}
    spec.update(kw)
    return spec


class Sim:
    """Fake clock + fake counters: each step adds `rate` requests waiting `queue_ms` each."""

    def __init__(self, pol, workers: dict[str, int]) -> None:
        self.policy, self.workers, self.t = pol, dict(workers), 0.0
        self.states = {n: ModelState() for n in pol.models}
        self.counters = {n: [0.0, 0.0, 0.0] for n in pol.models}

    def step(self, loads: dict[str, tuple[float, float, float]] | None = None, dt: float = 1.0, costs=None):
        self.t += dt
        for name, state in self.states.items():
            rate, queue_ms, in_flight = (loads or {}).get(name, (0.0, 0.0, 0.0))
            c = self.counters[name]
            c[0] += rate * dt
            c[1] += rate * dt * queue_ms * 1000
            c[2] += in_flight * dt * 1e6
            state.observe(Sample(self.t, c[0], c[1], c[2], pending=0), self.policy.models[name].look_back_s)
        wants = {n: decide.assess(self.policy.models[n], Observation(self.workers[n], self.workers[n]),
                                  self.states[n], self.t) for n in self.states}
        decisions = decide.allocate(self.policy, wants, costs)
        for d in decisions.values():
            if d.changes:
                self.workers[d.model] = d.target
                self.states[d.model].changed(self.t)
        return decisions

    def run(self, seconds: int, loads=None, costs=None) -> list[dict[str, int]]:
        return [dict(self.workers) for _ in range(seconds) if self.step(loads, costs=costs) is not None]


# -- the policy file -------------------------------------------------------------------------------

def test_issue_policy_parses_with_documented_defaults(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(ISSUE_POLICY)
    pol = load_policy(path)
    assert pol.interval_s == 2 and pol.budgets["cpu"].workers == 3 and pol.budgets["cpu"].memory_mb is None
    se = pol.models["search-embed"]
    assert (se.priority, se.min_workers, se.max_workers, se.target_queue_ms) == (10, 1, 3, 50)
    assert se.device == "cpu" and se.upscale_delay_s == 4 and se.downscale_delay_s == 60 and se.look_back_s == 10
    assert se.downscale_below == 0.5 and se.scale_from_zero is False and se.memory_mb is None


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(intervall_s=1), "intervall_s: unknown key"),
    (lambda d: d["models"]["search-embed"].update(target_queue=5), "models.search-embed.target_queue: unknown key"),
    (lambda d: d["models"]["search-embed"].pop("max_workers"), "models.search-embed.max_workers: required"),
    (lambda d: d["models"]["search-embed"].update(max_workers=0), "models.search-embed.max_workers: must be >= 1"),
    (lambda d: d["models"]["search-embed"].update(min_workers=4), "max_workers: 3 is below min_workers 4"),
    (lambda d: d["models"]["search-embed"].update(min_workers="1"), "models.search-embed.min_workers: expected a whole"),
    (lambda d: d["models"]["search-embed"].update(priority=True), "models.search-embed.priority: expected a whole"),
    (lambda d: d["models"]["search-embed"].update(target_queue_ms="fast"), "target_queue_ms: expected a number"),
    (lambda d: d["models"]["search-embed"].pop("target_queue_ms"), "models.search-embed: set target_queue_ms"),
    (lambda d: d["models"]["search-embed"].update(scale_from_zero=True), "scale_from_zero: only meaningful"),
    (lambda d: d["models"]["search-embed"].update(device="gpu0"), "models.search-embed.device: must be"),
    (lambda d: d["models"]["search-embed"].update(downscale_below=1.5), "downscale_below: must be below 1.0"),
    (lambda d: d["budgets"].update({"gpu": {"workers": 1}}), "budgets.gpu: device must be"),
    (lambda d: d["budgets"]["cpu"].update(cores=2), "budgets.cpu.cores: unknown key"),
    (lambda d: d["budgets"]["cpu"].update(workers=1), "budgets.cpu.workers: 1 cannot hold the min_workers"),
    (lambda d: d.update(models={}), "models: required"),
])
def test_bad_policy_names_the_key(mutate, key):
    data = yaml.safe_load(ISSUE_POLICY)
    mutate(data)
    with pytest.raises(PolicyError, match=key.replace("(", r"\(").replace(".", r"\.")):
        parse_policy(data)


def test_unreadable_policy_file_names_the_file(tmp_path):
    with pytest.raises(PolicyError, match="missing.yaml"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)


def test_single_budget_is_the_default_device_and_memory_must_fit_minimums():
    pol = parse_policy({"budgets": {"cuda:0": {"memory_mb": 1000}}, "models": {"a": model(memory_mb=400)}})
    assert pol.models["a"].device == "cuda:0"
    with pytest.raises(PolicyError, match=r"budgets\.cuda:0\.memory_mb"):
        parse_policy({"budgets": {"cuda:0": {"memory_mb": 1000}}, "models": {"a": model(min_workers=3, memory_mb=400)}})


# -- load measurement ------------------------------------------------------------------------------

def test_window_load_uses_counter_deltas_and_restarts_after_a_reset():
    state = ModelState()
    state.observe(Sample(0, 100, 5_000_000, 9_000_000, 0), look_back_s=10)
    state.observe(Sample(2, 120, 6_000_000, 10_000_000, 4), look_back_s=10)
    load = decide.window_load(state.samples)
    assert load.rate == pytest.approx(10.0)
    assert load.queue_ms == pytest.approx(50.0)  # 1e6 us over 20 requests
    assert load.in_flight == pytest.approx(0.5) and load.pending == 4
    state.observe(Sample(3, 5, 100, 100, 0), look_back_s=10)  # TorchServe restarted: counters reset
    assert len(state.samples) == 1 and decide.window_load(state.samples) is None


def test_window_keeps_only_the_look_back():
    state = ModelState()
    for t in range(10):
        state.observe(Sample(t, t, 0, 0, 0), look_back_s=3)
    assert [s.t for s in state.samples] == [6, 7, 8, 9]


# -- decisions -----------------------------------------------------------------------------------

def test_scale_up_after_the_delay_and_not_before():
    sim = Sim(policy(a=model(upscale_delay_s=2)), {"a": 1})
    over = {"a": (10, 150, 1.5)}  # 1.5 x target
    history = sim.run(4, over)
    # t=1: one sample (no data); t=2: over since 2; t=4: 2 s over -> up by ceil(1 x 0.5) = 1
    assert history == [{"a": 1}, {"a": 1}, {"a": 1}, {"a": 2}]


def test_scale_up_is_proportional_but_at_most_doubles_and_stops_at_max():
    sim = Sim(policy(a=model(upscale_delay_s=0, max_workers=5)), {"a": 2})
    sim.run(2, {"a": (10, 10_000, 4)})  # 100 x target
    assert sim.workers["a"] == 4
    sim.run(10, {"a": (10, 10_000, 4)})
    assert sim.workers["a"] == 5  # max_workers


def test_scale_down_one_step_per_delay():
    sim = Sim(policy(a=model(downscale_delay_s=5, min_workers=1)), {"a": 3})
    history = sim.run(16, {"a": (0, 0, 0)})
    counts = [h["a"] for h in history]
    assert counts[:6] == [3] * 6  # under since t=2, change at t=7
    assert counts[6] == 2 and 2 in counts and counts[-1] == 1
    assert all(b >= a - 1 for a, b in itertools.pairwise(counts))  # never more than one step at a time


def test_hysteresis_band_holds_and_noise_does_not_flap():
    sim = Sim(policy(a=model()), {"a": 2})
    sim.run(30, {"a": (10, 70, 0.1)})  # 0.7 x target, workers idle: inside the band, neither over nor under
    assert sim.workers["a"] == 2
    history = []
    for i in range(30):  # crosses the target every second: the upscale timer never completes
        sim.step({"a": (10, 120 if i % 2 else 20, 1.0)})
        history.append(sim.workers["a"])
    assert set(history) == {2}


def test_no_downscale_when_the_remaining_workers_would_be_busy():
    # low queue latency because 2 workers keep up; 1.6 requests in flight would not fit one worker
    sim = Sim(policy(a=model()), {"a": 2})
    sim.run(30, {"a": (20, 5, 1.6)})
    assert sim.workers["a"] == 2
    sim.run(30, {"a": (5, 5, 0.3)})  # 0.3 in flight: one worker suffices
    assert sim.workers["a"] == 1


def test_target_utilization_scales_to_the_measured_need_in_one_step():
    # 20/s, 5 ms queue (far under target), 1.5 requests in service on 1 worker: the queue alone says
    # hold; at target_utilization 0.5 the work needs ceil(1.5 / 0.5) = 3 workers, in one step
    load = {"a": (20, 5, 1.6)}  # in flight 1.6 = 1.5 in service + 20/s x 5 ms queued
    plain = Sim(policy(a=model(max_workers=5, upscale_delay_s=1)), {"a": 1})
    assert {h["a"] for h in plain.run(10, load)} == {1}
    sim = Sim(policy(a=model(max_workers=5, upscale_delay_s=1, target_utilization=0.5)), {"a": 1})
    history = [h["a"] for h in sim.run(4, load)]
    assert history == [1, 1, 3, 3]  # t=2 over, t=3 after the 1 s delay: 1 -> 3; then 0.5 busy per worker: hold
    d = sim.step(load)["a"]
    assert d.load.busy == pytest.approx(1.5) and d.ratio == pytest.approx(1.0) and d.reason == decide.HOLD


def test_saturated_workers_are_sized_by_arrivals_over_completions():
    # one worker busy all the time (2 s of service in 2 s) while 60 arrived and the queue grew by 20:
    # 40 completed, so the arrivals bring 1.5 workers of work, not the 1.0 a saturated worker shows
    state = ModelState()
    state.observe(Sample(0, 0, 0, 0, 0), look_back_s=10)
    state.observe(Sample(2, 60, 10e6, 12e6, 20), look_back_s=10)
    load = decide.window_load(state.samples)
    assert load.busy == pytest.approx(1.0) and load.demand == pytest.approx(1.5)
    mp = policy(a=model(target_utilization=0.5, max_workers=5)).models["a"]
    assert decide.needed_workers(mp, load, batch_size=1) == 3


def test_target_utilization_alone_is_a_valid_target_and_must_be_a_fraction():
    pol = parse_policy({"models": {"a": {"max_workers": 2, "target_utilization": 0.6}}})
    assert pol.models["a"].target_utilization == 0.6 and pol.models["a"].target_queue_ms is None
    assert parse_policy({"models": {"a": model()}}).models["a"].target_utilization is None  # default: off
    with pytest.raises(PolicyError, match=r"models\.a\.target_utilization: a fraction"):
        parse_policy({"models": {"a": model(target_utilization=1.5)}})


def test_target_utilization_downscales_only_while_one_worker_fewer_stays_under_it():
    sim = Sim(policy(a=model(target_utilization=0.5, downscale_delay_s=3)), {"a": 3})
    # 1.2 in service: 0.4 per worker at 3 (under 0.5), but 0.6 at 2 would be over: hold at 3
    assert {h["a"] for h in sim.run(20, {"a": (10, 0, 1.2)})} == {3}
    # 0.8 in service: 0.4 per worker at 2, 0.8 at 1: down to 2 and no further, no flapping
    history = [h["a"] for h in sim.run(30, {"a": (10, 0, 0.8)})]
    assert history[-1] == 2 and min(history) == 2 and history == sorted(history, reverse=True)


def test_clamped_to_min_and_max():
    pol = policy(a=model(min_workers=2, max_workers=3))
    state = ModelState()
    below = decide.assess(pol.models["a"], Observation(1, 1), state, 0)
    above = decide.assess(pol.models["a"], Observation(5, 5), state, 0)
    assert (below.want, below.reason) == (2, decide.BELOW_MIN) and (above.want, above.reason) == (3, decide.ABOVE_MAX)
    sim = Sim(pol, {"a": 3})
    assert max(h["a"] for h in sim.run(20, {"a": (50, 5000, 10)})) == 3
    assert min(h["a"] for h in sim.run(40, {"a": (0, 0, 0)})) == 2


def test_settling_workers_hold_decisions():
    pol = policy(a=model(upscale_delay_s=0))
    state = ModelState()
    state.changed(0)
    state.observe(Sample(0, 0, 0, 0, 0), 3)
    state.observe(Sample(1, 10, 10_000_000, 0, 0), 3)
    want = decide.assess(pol.models["a"], Observation(workers=3, ready=1), state, 1)
    assert want.reason == decide.SETTLING and want.want == 3


def test_the_backlog_of_a_worker_start_does_not_drive_the_next_step():
    pol = policy(a=model(upscale_delay_s=0, target_queue_ms=100, settle_timeout_s=30))
    mp, state = pol.models["a"], ModelState()
    state.changed(0)  # 1 -> 2 workers set at t=0
    queue_us = 0.0
    for t in range(1, 6):  # the new worker takes 5 s to start: 1 s of queue per request meanwhile
        queue_us += 10 * 1e6
        state.observe(Sample(t, 10 * t, queue_us, 0, 0), mp.look_back_s)
        assert decide.assess(mp, Observation(workers=2, ready=1), state, t).reason == decide.SETTLING
    queue_us += 10 * 1e6  # the last of the backlog drains in the first second with 2 READY workers
    state.observe(Sample(6, 60, queue_us, 0, 0), mp.look_back_s)
    want = decide.assess(mp, Observation(workers=2, ready=2), state, 6)
    assert want.reason == decide.NO_DATA  # only the READY sample is in the window: the start is not load
    state.observe(Sample(7, 70, queue_us + 10 * 20_000, 0, 0), mp.look_back_s)  # then 20 ms queue
    want = decide.assess(mp, Observation(workers=2, ready=2), state, 7)
    assert (want.reason, want.want) == (decide.HOLD, 2) and want.load.queue_ms == pytest.approx(20)


def test_workers_that_never_start_block_scale_ups_after_the_settle_timeout():
    pol = policy(a=model(upscale_delay_s=0, settle_timeout_s=3, max_workers=5))
    mp, state = pol.models["a"], ModelState()
    wants = []
    for t in range(1, 8):
        state.observe(Sample(t, 10 * t, 10 * t * 1e6, 0, 0), mp.look_back_s)  # 1 s queue: far over target
        wants.append(decide.assess(mp, Observation(workers=2, ready=1), state, t))
    assert [w.reason for w in wants[:3]] == [decide.SETTLING] * 3
    assert {w.reason for w in wants[3:]} == {decide.START_TIMEOUT} and {w.want for w in wants} == {2}
    state.observe(Sample(8, 80, 80e6, 0, 0), mp.look_back_s)
    assert decide.assess(mp, Observation(workers=2, ready=2), state, 8).reason == decide.NO_DATA  # READY again


def test_budget_binds_higher_priority_preempts_lower_never_the_reverse():
    pol = policy({"cpu": {"workers": 4}}, hi=model(priority=10, upscale_delay_s=0), lo=model(priority=1, upscale_delay_s=0))
    sim = Sim(pol, {"hi": 1, "lo": 3})
    decisions = None
    for _ in range(6):
        decisions = sim.step({"hi": (50, 1000, 5), "lo": (50, 1000, 5)}) if decisions is None or sim.workers["hi"] < 3 else decisions
    assert sim.workers == {"hi": 3, "lo": 1}
    assert sum(sim.workers.values()) <= 4
    # the low-priority model, overloaded, cannot take anything back from the high one
    for _ in range(10):
        d = sim.step({"hi": (10, 70, 0.7), "lo": (50, 1000, 5)})
        assert sim.workers == {"hi": 3, "lo": 1}
    assert d["lo"].reason == decide.BUDGET_CAPPED and d["lo"].want == 2


def test_preemption_reason_and_budget_never_exceeded():
    pol = policy({"cpu": {"workers": 3}}, hi=model(priority=5), lo=model(priority=1))
    wants = {"hi": decide.Want("hi", 1, 3, decide.SCALE_UP), "lo": decide.Want("lo", 2, 2, decide.HOLD)}
    d = decide.allocate(pol, wants)
    assert (d["hi"].target, d["lo"].target, d["lo"].reason) == (2, 1, decide.PREEMPTED)


def test_equal_priorities_share_round_robin_and_keep_what_they_have():
    pol = policy({"cpu": {"workers": 4}}, a=model(), b=model())
    wants = {"a": decide.Want("a", 1, 3, decide.SCALE_UP), "b": decide.Want("b", 2, 3, decide.SCALE_UP)}
    d = decide.allocate(pol, wants)
    assert d["a"].target + d["b"].target == 4 and d["b"].target >= 2


def test_memory_budget_uses_declared_then_measured_cost_and_refuses_unknown():
    pol = policy({"cuda:0": {"memory_mb": 10_000}}, a=model(memory_mb=3000, priority=2), b=model(priority=1))
    wants = {"a": decide.Want("a", 1, 3, decide.SCALE_UP), "b": decide.Want("b", 1, 3, decide.SCALE_UP)}
    d = decide.allocate(pol, wants, {"b": 2000})
    # a: 3 x 3000 = 9000; b keeps its minimum (2000) although that leaves 11000 > budget? no: a is cut to fit
    assert d["a"].target * 3000 + d["b"].target * 2000 <= 10_000 and d["b"].target >= 1
    assert d["a"].target == 2 and d["b"].target == 2
    unknown = policy({"cpu": {"memory_mb": 10_000}}, c=model())
    d = decide.allocate(unknown, {"c": decide.Want("c", 1, 3, decide.SCALE_UP)}, {"c": None})
    assert d["c"].target == 1 and d["c"].reason == decide.COST_UNKNOWN


def test_min_zero_scales_to_zero_when_idle_and_back_from_zero_on_arrivals():
    pol = policy(z=model(min_workers=0, scale_from_zero=True, downscale_delay_s=3), n=model(min_workers=0))
    sim = Sim(pol, {"z": 1, "n": 1})
    sim.run(10)
    assert sim.workers == {"z": 0, "n": 0}
    sim.step({"z": (2, 0, 0), "n": (2, 0, 0)})  # requests answered 503 still count as arrivals
    sim.step({"z": (2, 0, 0), "n": (2, 0, 0)})
    assert sim.workers == {"z": 1, "n": 0}  # without scale_from_zero it stays parked


def test_not_to_zero_while_requests_arrive():
    sim = Sim(policy(z=model(min_workers=0, scale_from_zero=True, downscale_delay_s=2)), {"z": 1})
    sim.run(20, {"z": (0.5, 0, 0.01)})
    assert sim.workers["z"] == 1


# -- the TorchServe edge ---------------------------------------------------------------------------

TS_METRICS = """# HELP ts_inference_requests_total Total number of inference requests received
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="lo",model_version="default",hostname="vm",} 2.0
ts_inference_requests_total{model_name="hi",model_version="default",hostname="vm",} 3.0
ts_inference_requests_total{model_name="hi",model_version="2.0",hostname="vm",} 1.0
ts_queue_latency_microseconds{model_name="hi",model_version="default",hostname="vm",} 561.598
HandlerTime{ModelName="hi",Level="Model",Hostname="vm",} 147.305
Requests5XX{Level="Host",Hostname="vm",} 2.0
"""


def test_prometheus_counters_per_model():
    counters = model_counters(TS_METRICS)
    assert counters["hi"]["ts_inference_requests_total"] == 4.0
    assert counters["hi"]["ts_queue_latency_microseconds"] == pytest.approx(561.598)
    assert counters["lo"]["ts_inference_requests_total"] == 2.0 and counters["lo"]["ts_queue_latency_microseconds"] == 0


def test_model_info_from_describe_json():
    info = ModelInfo.from_json("hi", [{"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "workers": [
        {"id": "9000", "status": "READY", "pid": 7, "memoryUsage": 1048576},
        {"id": "9001", "status": "UNLOADING", "pid": 8, "memoryUsage": 0}],
        "jobQueueStatus": {"remainingCapacity": 99, "pendingRequests": 1}}])
    assert (info.min_workers, info.ready, info.pending, info.batch_size) == (2, 1, 1, 4)


class FakeTorchServe:
    """A management API with token auth: 400 InvalidKeyException for any key but the current one."""

    def __init__(self, key_file) -> None:
        self.key_file, self.key, self.renewals, self.calls = key_file, "k1", 0, []
        self.write("k1", "2000-01-01T00:00:00.123456789Z")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                auth = self.headers.get("Authorization", "")
                if self.path.startswith("/token"):
                    assert auth == "Bearer api"
                    fake.renewals += 1
                    fake.key = f"k{fake.renewals + 1}"
                    fake.write(fake.key, "2999-01-01T00:00:00.1Z")
                    return self._answer(200, {})
                fake.calls.append(auth)
                if auth != f"Bearer {fake.key}":
                    return self._answer(400, {"code": 400, "type": "InvalidKeyException",
                                              "message": "Token Authorization failed."})
                return self._answer(200, [{"minWorkers": 1, "maxWorkers": 1, "workers": []}])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def write(self, key: str, expires: str) -> None:
        self.key_file.write_text(json.dumps({"management": {"key": key, "expiration time": expires},
                                             "inference": {"key": "i"}, "API": {"key": "api"}}))


def test_management_key_is_reread_on_rotation_and_renewed_when_expired(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json")
    try:
        client = ManagementClient(fake.url, KeyFile(tmp_path / "key_file.json"))
        assert client.describe("m").min_workers == 1 and fake.renewals == 0
        fake.key = "rotated"  # someone renewed it: the file says so, the cached key is stale
        fake.write("rotated", "2999-01-01T00:00:00Z")
        assert client.describe("m").min_workers == 1 and fake.calls[-1] == "Bearer rotated"
        fake.key = "server-side-only"  # the key in the file has expired: renew it with the API key
        fake.write("rotated", "2000-01-01T00:00:00.332408214Z")  # Java's nanosecond stamp
        assert client.describe("m").min_workers == 1 and fake.renewals == 1
        no_file = ManagementClient(fake.url, KeyFile(None))
        with pytest.raises(Exception, match="--key-file"):
            no_file.describe("m")
    finally:
        fake.server.shutdown()


class FakeManagement:
    """Workers set by `scale` are READY after `start_ticks` describes of their model (never: `broken`)."""

    url = "fake://"

    def __init__(self, workers: dict[str, int], fail: set[str] = frozenset(), start_ticks: int = 0,
                 broken: set[str] = frozenset()) -> None:
        self.workers, self.fail, self.calls, self.unreachable = dict(workers), set(fail), [], False
        self.ready = dict(workers)
        self.start_ticks, self.broken, self.starting = start_ticks, set(broken), {}

    def describe(self, name):
        if self.unreachable:
            raise Unreachable("down")
        if name not in self.workers:
            raise ModelNotFound(f"model {name!r} is not registered")
        left = self.starting.get(name, 0)
        if left <= 0 and name not in self.broken:
            self.ready[name] = self.workers[name]
        self.starting[name] = left - 1
        n, ready = self.workers[name], min(self.ready[name], self.workers[name])
        workers = tuple(WorkerInfo(str(i), "READY" if i < ready else "WORKER_STARTED", i, 0, False) for i in range(n))
        return ModelInfo(name, n, n, 1, 0, workers)

    def scale(self, name, n, wait=True):
        self.calls.append((name, n, wait))
        if name in self.fail:
            raise ScaleFailed("Failed to start workers")
        self.workers[name] = n
        self.ready[name] = min(self.ready[name], n)
        self.starting[name] = 0 if wait else self.start_ticks
        return "ok"


def test_controller_applies_decreases_before_increases_and_survives_failures():
    pol = parse_policy({"interval_s": 1, "budgets": {"cpu": {"workers": 4}}, "models": {
        "hi": model(priority=9, upscale_delay_s=0, settle_timeout_s=1), "lo": model(priority=1, settle_timeout_s=1),
        "ghost": model()}})
    t = [0.0]
    load = {"hi": [0.0, 0.0]}

    def scrape(url):
        load["hi"][0] += 50
        load["hi"][1] += 50 * 1e6  # 1 s queue per request: far over target
        return {"hi": {"ts_inference_requests_total": load["hi"][0], "ts_queue_latency_microseconds": load["hi"][1]}}

    mgmt = FakeManagement({"hi": 1, "lo": 3})
    reg = Registry()
    ctl = Controller(pol, mgmt, "fake://metrics", registry=reg, clock=lambda: t[0], scrape=scrape)
    for _ in range(8):
        t[0] += 1
        ctl.tick()
    assert mgmt.workers == {"hi": 3, "lo": 1}
    first_up = next(i for i, c in enumerate(mgmt.calls) if c[0] == "hi")
    assert mgmt.calls[first_up - 1][0] == "lo"  # lo gave its worker back before hi took it
    assert "ghost" in ctl.missing and reg.get("tsgpu_autoscale_workers", model="hi") == 3
    assert reg.get("tsgpu_autoscale_decisions_total", model="lo", reason="preempted") == 2
    # unreachable TorchServe: run() logs, backs off and keeps going
    mgmt.unreachable = True
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    Controller(pol, mgmt, "fake://metrics", registry=reg, scrape=scrape).run(stop)
    assert reg.get("tsgpu_autoscale_errors_total", kind="unreachable") >= 1


def test_a_failed_scale_backs_off_and_dry_run_changes_nothing():
    pol = parse_policy({"interval_s": 1, "models": {"hi": model(upscale_delay_s=0, settle_timeout_s=1)}})
    t = [0.0]
    n = [0.0]

    def scrape(url):
        n[0] += 50
        return {"hi": {"ts_inference_requests_total": n[0], "ts_queue_latency_microseconds": n[0] * 1e6}}

    mgmt = FakeManagement({"hi": 1}, fail={"hi"})
    ctl = Controller(pol, mgmt, "m", clock=lambda: t[0], scrape=scrape)
    for _ in range(10):
        t[0] += 1
        ctl.tick()
    assert 1 <= len(mgmt.calls) <= 3  # first failure backs off 2 s, the next 4 s, ...
    dry = FakeManagement({"hi": 1})
    ctl = Controller(pol, dry, "m", dry_run=True, clock=lambda: t[0], scrape=scrape)
    for _ in range(5):
        t[0] += 1
        ctl.tick()
    assert dry.calls == [] and dry.workers == {"hi": 1}


def test_increases_are_asynchronous_and_the_loop_keeps_deciding_while_workers_start():
    pol = parse_policy({"interval_s": 1, "budgets": {"cpu": {"workers": 4}}, "models": {
        "hi": model(priority=9, upscale_delay_s=0, max_workers=3), "lo": model(priority=1, upscale_delay_s=0)}})
    t = [0.0]
    counts = {"hi": [0.0, 0.0], "lo": [0.0, 0.0]}

    def scrape(url):
        for c in counts.values():  # both far over target (1 s queue per request)
            c[0] += 50
            c[1] += 50 * 1e6
        return {n: {"ts_inference_requests_total": c[0], "ts_queue_latency_microseconds": c[1]}
                for n, c in counts.items()}

    mgmt = FakeManagement({"hi": 1, "lo": 1}, start_ticks=4)
    reg = Registry()
    ctl = Controller(pol, mgmt, "m", registry=reg, clock=lambda: t[0], scrape=scrape)
    seen = []
    for _ in range(12):
        t[0] += 1
        ctl.tick()
        seen.append(dict(mgmt.workers))
    ups = [c for c in mgmt.calls if c[2] is False]
    downs = [c for c in mgmt.calls if c[2] is True]
    assert ups and all(n > 0 for _, n, _ in ups)
    # hi doubled to 2 while lo took 2 at once; hi reached 3 only after its second worker was READY,
    # taking lo's extra worker back (a synchronous decrease first); never more than 4 set in all
    assert seen[1] == {"hi": 2, "lo": 2}
    assert all(sum(w.values()) <= 4 for w in seen)
    assert mgmt.workers == {"hi": 3, "lo": 1} and downs == [("lo", 1, True)]
    hi_up_at = [i for i, c in enumerate(mgmt.calls) if c[0] == "hi"]
    assert mgmt.calls[hi_up_at[1] - 1] == ("lo", 1, True)
    assert reg.get("tsgpu_autoscale_errors_total", kind="start_timeout") is None


def test_a_worker_that_never_starts_is_logged_once_and_blocks_scale_ups(caplog):
    pol = parse_policy({"interval_s": 1, "models": {"hi": model(upscale_delay_s=0, settle_timeout_s=3, max_workers=5)}})
    t = [0.0]
    n = [0.0]

    def scrape(url):
        n[0] += 50
        return {"hi": {"ts_inference_requests_total": n[0], "ts_queue_latency_microseconds": n[0] * 1e6}}

    mgmt = FakeManagement({"hi": 1}, broken={"hi"})
    mgmt.ready["hi"] = 1
    reg = Registry()
    ctl = Controller(pol, mgmt, "m", registry=reg, clock=lambda: t[0], scrape=scrape)
    with caplog.at_level("INFO", logger="tsgpu.autoscale"):
        for _ in range(12):
            t[0] += 1
            ctl.tick()
    assert mgmt.workers == {"hi": 2} and mgmt.calls == [("hi", 2, False)]
    assert reg.get("tsgpu_autoscale_errors_total", kind="start_timeout") == 1
    assert sum("workers READY after settle_timeout_s" in r.message for r in caplog.records) == 1


def test_scale_from_zero_reacts_to_a_503_answered_between_the_park_and_the_next_tick():
    """The real clock moves while a scale call runs: the arrivals after the tick's sample must still count."""
    pol = parse_policy({"interval_s": 1, "models": {
        "z": model(min_workers=0, scale_from_zero=True, downscale_delay_s=2, look_back_s=3)}})
    t = [0.0]
    requests = [0.0]

    class SlowManagement(FakeManagement):
        def scale(self, name, n, wait=True):
            t[0] += 0.3  # a synchronous decrease returns when the worker is stopped
            return super().scale(name, n, wait)

    mgmt = SlowManagement({"z": 1})
    ctl = Controller(pol, mgmt, "m", clock=lambda: t[0],
                     scrape=lambda url: {"z": {"ts_inference_requests_total": requests[0]}})
    for _ in range(6):  # idle: parked at 0 after downscale_delay_s
        t[0] += 1
        ctl.tick()
        if mgmt.workers["z"] == 0:
            break
    assert mgmt.calls == [("z", 0, True)]
    requests[0] += 1  # right after the park: one request, answered 503 (TorchServe still counts it), then none
    for _ in range(2):
        t[0] += 1
        ctl.tick()
    assert mgmt.workers == {"z": 1} and mgmt.calls[-1] == ("z", 1, False)


def test_a_busy_metrics_port_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    import socket

    from autoscaler.main import main

    policy = tmp_path / "policy.yaml"
    policy.write_text("interval_s: 2\nmodels:\n  m: {min_workers: 1, max_workers: 2, target_queue_ms: 50}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--policy", str(policy), "--listen", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"--listen 127.0.0.1:{port}" in err and "--listen off" in err and "Traceback" not in err
    assert main(["--policy", str(policy), "--listen", "nonsense"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
