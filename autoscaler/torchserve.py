"""The edge to a stock TorchServe 0.12: management API, token keys, Prometheus metrics (stdlib only).

- `KeyFile`: the management key from TorchServe's `key_file.json` (token authorization is on by
  default). A call answered 400/401 re-reads the file (TorchServe restarted, or someone renewed the
  key); if the key in the file has expired, it is renewed once with the file's API key
  (`GET /token?type=management`), as TorchServe's docs tell a user to do.
- `ManagementClient`: `GET /models/{name}` -> `ModelInfo`, and
  `PUT /models/{name}?min_worker=N&max_worker=N[&synchronous=true]` (TorchServe only adds workers
  below min and removes those above max, so min = max = N).
- `scrape_metrics`: `ts_*` counters per model from the metrics address (metrics_mode=prometheus), and
  the metric families the answer declares (`Scrape.families`): with TorchServe's default
  metrics_mode=log the address answers 200 with an empty body, which `autoscaler.signals` tells apart
  from an idle model.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("tsgpu.autoscale")


class TorchServeError(RuntimeError):
    """A management or metrics call failed; `kind` is a short label for logs and metrics."""

    kind = "error"


class Unreachable(TorchServeError):
    kind = "unreachable"


class AuthError(TorchServeError):
    kind = "auth"


class ModelNotFound(TorchServeError):
    kind = "model_not_found"


class ScaleFailed(TorchServeError):
    kind = "scale_failed"


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    status: str
    pid: int | None
    memory_bytes: int
    gpu: bool


@dataclass(frozen=True)
class ModelInfo:
    name: str
    min_workers: int
    max_workers: int
    batch_size: int
    pending: int
    workers: tuple[WorkerInfo, ...]

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers if w.status == "READY")

    @classmethod
    def from_json(cls, name: str, data: Any) -> ModelInfo:
        model = data[0] if isinstance(data, list) else data
        workers = tuple(
            WorkerInfo(id=str(w.get("id", "")), status=str(w.get("status", "")),
                       pid=int(w["pid"]) if w.get("pid") else None,
                       memory_bytes=int(w.get("memoryUsage") or 0), gpu=bool(w.get("gpu")))
            for w in model.get("workers", [])
        )
        queue = model.get("jobQueueStatus") or {}
        return cls(name=name, min_workers=int(model.get("minWorkers", 0)),
                   max_workers=int(model.get("maxWorkers", 0)), batch_size=int(model.get("batchSize", 1)),
                   pending=int(queue.get("pendingRequests", 0)), workers=workers)


class KeyFile:
    """The management key of a TorchServe key_file.json, re-read when it stops working."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            raise AuthError("TorchServe asks for a management key (token authorization is on): pass "
                            "--key-file PATH/key_file.json (written where torchserve was started)")
        try:
            data = json.loads(self.path.read_text())
            data["management"]["key"]
        except FileNotFoundError:
            raise AuthError(f"key file {self.path}: not found (TorchServe writes key_file.json in the "
                            "directory it was started from, and deletes it when it stops)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"key file {self.path}: unreadable or without management.key ({exc})") from None
        return data

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def management_key(self) -> str | None:
        if self.path is None:
            return None
        if self._data is None:
            self._data = self._load()
        return str(self._data["management"]["key"])

    def reload(self) -> bool:
        """Read the file again; True when the management key changed."""
        old = self._data["management"]["key"] if self._data else None
        self._data = self._load()
        return self._data["management"]["key"] != old

    def expired(self, now: datetime | None = None) -> bool:
        stamp = (self._data or {}).get("management", {}).get("expiration time")
        if not stamp:
            return False
        try:
            when = datetime.fromisoformat(_trim_nanos(stamp))
        except ValueError:
            return False
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when <= (now or datetime.now(timezone.utc))

    def api_key(self) -> str | None:
        api = (self._data or {}).get("API") or {}
        return api.get("key")


def _trim_nanos(stamp: str) -> str:
    # Java writes "2026-11-24T16:31:01.332408214Z": 9 fraction digits, which fromisoformat may refuse
    stamp = stamp.replace("Z", "+00:00")
    if "." in stamp:
        head, _, rest = stamp.partition(".")
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        tail = rest[len(digits):]
        stamp = f"{head}.{digits[:6]}{tail}"
    return stamp


class ManagementClient:
    """TorchServe's management API, with token keys handled."""

    def __init__(self, url: str, keys: KeyFile | None = None, timeout: float = 10.0,
                 scale_timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.keys = keys or KeyFile(None)
        self.timeout = timeout
        self.scale_timeout = scale_timeout

    def describe(self, name: str) -> ModelInfo:
        status, body = self._call("GET", f"/models/{urllib.parse.quote(name)}", self.timeout)
        if status == 404:
            raise ModelNotFound(f"model {name!r} is not registered in TorchServe at {self.url}")
        if status != 200:
            raise TorchServeError(f"GET /models/{name}: HTTP {status}: {_message(body)}")
        try:
            return ModelInfo.from_json(name, json.loads(body))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TorchServeError(f"GET /models/{name}: unexpected answer ({exc}): {body[:200]!r}") from None

    def list_models(self) -> list[str]:
        """Names of the registered models (`GET /models`, every page)."""
        names: list[str] = []
        token = ""
        while True:
            query = urllib.parse.urlencode({"limit": 100, **({"next_page_token": token} if token else {})})
            status, body = self._call("GET", f"/models?{query}", self.timeout)
            if status != 200:
                raise TorchServeError(f"GET /models: HTTP {status}: {_message(body)}")
            try:
                data = json.loads(body)
                names += [str(m["modelName"]) for m in data.get("models", [])]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TorchServeError(f"GET /models: unexpected answer ({exc}): {body[:200]!r}") from None
            token = str(data.get("nextPageToken") or "")
            if not token:
                return names

    def scale(self, name: str, workers: int, wait: bool = True) -> str:
        """Set min = max = workers. `wait`: until TorchServe has started or stopped them (synchronous=true);
        else TorchServe answers 202 at once and starts the workers in the background."""
        params: dict[str, object] = {"min_worker": workers, "max_worker": workers}
        if wait:
            params["synchronous"] = "true"
        query = urllib.parse.urlencode(params)
        status, body = self._call("PUT", f"/models/{urllib.parse.quote(name)}?{query}",
                                  self.scale_timeout if wait else self.timeout)
        if status == 404:
            raise ModelNotFound(f"model {name!r} is not registered in TorchServe at {self.url}")
        if status == 206:
            return "scaling in progress"
        if status == 202:
            return "accepted, workers starting in the background"
        if status != 200:
            raise ScaleFailed(f"PUT /models/{name} to {workers} workers: HTTP {status}: {_message(body)}")
        return _message(body)

    def _call(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        status, body = self._send(method, path, timeout)
        if status not in (400, 401) or not _is_auth_failure(body):
            return status, body
        if not self.keys.enabled:
            self.keys.management_key()  # raises the "pass --key-file" AuthError
        changed = self.keys.reload()
        if changed:
            log.info("management key changed in %s: using the new one", self.keys.path)
        elif self.keys.expired():
            self._renew()
            log.info("management key in %s had expired: renewed it with the API key", self.keys.path)
        status, body = self._send(method, path, timeout)
        if status in (400, 401) and _is_auth_failure(body):
            raise AuthError(f"{method} {path}: TorchServe refused the management key from {self.keys.path} "
                            f"(HTTP {status}: {_message(body)})")
        return status, body

    def _renew(self) -> None:
        api = self.keys.api_key()
        if not api:
            raise AuthError(f"management key in {self.keys.path} expired and the file has no API key to renew it")
        status, body = self._send("GET", "/token?type=management", self.timeout, key=api)
        if status != 200:
            raise AuthError(f"renewing the expired management key failed: HTTP {status}: {_message(body)}")
        self.keys.reload()

    def _send(self, method: str, path: str, timeout: float, key: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, method=method)
        key = key or self.keys.management_key()
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"TorchServe management API at {self.url} unreachable ({reason})") from None


def _is_auth_failure(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    return "InvalidKeyException" in text or "Token Authorization failed" in text


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
        return str(data.get("message") or data.get("status") or data)
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:300]


# -- metrics ------------------------------------------------------------------------------------

COUNTERS = ("ts_inference_requests_total", "ts_queue_latency_microseconds", "ts_inference_latency_microseconds")


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, labels, rest = line, {}, ""
        if "{" in line:
            name, _, tail = line.partition("{")
            body, _, rest = tail.rpartition("}")
            labels = _parse_labels(body)
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            samples.append((name.strip(), labels, float(fields[0])))
        except ValueError:
            continue
    return samples


def _parse_labels(body: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(body):
        eq = body.find("=", i)
        if eq < 0:
            break
        key = body[i:eq].strip().lstrip(",").strip()
        j = eq + 1
        if j >= len(body) or body[j] != '"':
            break
        j += 1
        value = []
        while j < len(body) and body[j] != '"':
            if body[j] == "\\" and j + 1 < len(body):
                j += 1
                value.append({"n": "\n"}.get(body[j], body[j]))
            else:
                value.append(body[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
    return labels


class Scrape(dict[str, dict[str, float]]):
    """{model: {counter: value}} of one scrape, and `families`: every metric name the answer declares
    (`# HELP` / `# TYPE` lines and samples), None when not known (a fake in tests). TorchServe in
    metrics_mode=prometheus declares the ts_* families from its start, before any request; in log
    mode (its default) the address answers 200 with an empty body (measured, 0.12.0)."""

    def __init__(self, counters: Mapping[str, Mapping[str, float]] | None = None,
                 families: frozenset[str] | None = None) -> None:
        super().__init__({name: dict(c) for name, c in (counters or {}).items()})
        self.families = families


def metric_families(text: str) -> frozenset[str]:
    """Metric names declared in a Prometheus text exposition (HELP/TYPE lines and sample names)."""
    names = {name for name, _, _ in parse_prometheus(text)}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "#" and fields[1] in ("HELP", "TYPE"):
            names.add(fields[2])
    return frozenset(names)


def model_counters(text: str) -> dict[str, dict[str, float]]:
    """{model: {counter: value}} for the ts_* counters, summed over model versions."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0.0))
    for name, labels, value in parse_prometheus(text):
        if name in COUNTERS and "model_name" in labels:
            out[labels["model_name"]][name] += value
    return dict(out)


def metrics_endpoint(url: str) -> str:
    target = url.rstrip("/")
    return target if target.endswith("/metrics") else target + "/metrics"


def scrape_metrics(url: str, timeout: float = 10.0) -> Scrape:
    """GET {url}/metrics: the per-model counters and the families declared."""
    target = metrics_endpoint(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise TorchServeError(f"metrics at {target}: HTTP {exc.code} (is metrics_mode=prometheus set?)") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"TorchServe metrics at {target} unreachable ({getattr(exc, 'reason', exc)})") from None
    return Scrape(model_counters(text), metric_families(text))


def gpu_memory_mb_by_pid() -> dict[int, dict[int, float]]:
    """{GPU index: {pid: MB used}} from NVML; {} without pynvml or a GPU. Unverified on a GPU here."""
    try:
        import pynvml  # optional: pip install nvidia-ml-py
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / no GPU: nothing to measure
        return {}
    used: dict[int, dict[int, float]] = defaultdict(dict)
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory:
                    used[index][int(proc.pid)] = proc.usedGpuMemory / 2**20
    except Exception:  # noqa: BLE001 - NVML errors must not stop the controller
        return dict(used)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return dict(used)
