"""The controller's own Prometheus metrics, served as text on a loopback port (stdlib only).

    tsgpu_autoscale_workers{model}                 workers set (what TorchServe maintains)
    tsgpu_autoscale_ready_workers{model}           workers READY at the last tick
    tsgpu_autoscale_wanted_workers{model}          what the model wanted before the budget
    tsgpu_autoscale_queue_ms{model}                mean queue ms over the look-back window
    tsgpu_autoscale_request_rate{model}            requests per second over the window
    tsgpu_autoscale_pending{model}                 mean pending requests over the window
    tsgpu_autoscale_decisions_total{model,reason}  worker changes decided, by reason
    tsgpu_autoscale_errors_total{kind}             failed calls (unreachable, auth, scale_failed, ...)
    tsgpu_autoscale_blind{model}                   1 when the metrics lack the series its decisions read
    tsgpu_autoscale_torchserve_up                  1 when the last tick reached TorchServe
    tsgpu_autoscale_ticks_total                    control ticks run
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HELP = {
    "tsgpu_autoscale_workers": ("gauge", "Workers set for the model (min = max in TorchServe)."),
    "tsgpu_autoscale_ready_workers": ("gauge", "Workers READY at the last tick."),
    "tsgpu_autoscale_wanted_workers": ("gauge", "Workers the model wanted before the budget."),
    "tsgpu_autoscale_queue_ms": ("gauge", "Mean queue latency per request over the look-back window (ms)."),
    "tsgpu_autoscale_request_rate": ("gauge", "Requests per second over the look-back window."),
    "tsgpu_autoscale_pending": ("gauge", "Mean pending requests over the look-back window."),
    "tsgpu_autoscale_decisions_total": ("counter", "Worker-count changes decided, by reason."),
    "tsgpu_autoscale_errors_total": ("counter", "Failed TorchServe calls, by kind."),
    "tsgpu_autoscale_blind": ("gauge", "1 when the metrics lack the series the model's decisions read "
                              "(set metrics_mode=prometheus), else 0."),
    "tsgpu_autoscale_torchserve_up": ("gauge", "1 when the last tick reached TorchServe, else 0."),
    "tsgpu_autoscale_ticks_total": ("counter", "Control ticks run."),
}


class Registry:
    """Thread-safe gauges and counters keyed by (name, sorted labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = float(value)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def remove(self, name: str, **labels: str) -> None:
        with self._lock:
            self._values.pop((name, tuple(sorted(labels.items()))), None)

    def get(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))))

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                kind, text = _HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serve(registry: Registry, host: str = "127.0.0.1", port: int = 9465) -> ThreadingHTTPServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet scrapes
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tsgpu-autoscale-metrics", daemon=True).start()
    return server
