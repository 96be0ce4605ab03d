"""Run a stock `torchserve` on loopback for the demo, tests and benchmarks.

Each `TorchServe` instance is isolated so several can run one after another (or at once) on one
host: its own working directory with a TMPDIR (torchserve refuses to start while another instance's
`$TMPDIR/.model_server.pid` exists), its own `java.io.tmpdir` (the frontend puts worker sockets
and unpacked archives there), its own free ports, and its own log directory.

    with TorchServe(model_store, models=["demo"]) as ts:
        ts.wait_ready(["demo"])
        requests.post(ts.inference_url + "/predictions/demo", ...)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from .java import find_java

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.properties"
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines of a Java properties file (comments and blanks skipped)."""
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


def torchserve_executable() -> str:
    """The `torchserve` script of this Python environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / "torchserve"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("torchserve")
    if not found:
        raise ServerError("torchserve is not installed: pip install torchserve==0.12.0")
    return found


class TorchServe:
    """A stock torchserve process serving `model_store` on loopback with free ports."""

    def __init__(
        self,
        model_store: str | Path,
        models: Iterable[str] = ("all",),
        workdir: str | Path | None = None,
        base_config: str | Path | None = REPO_CONFIG,
        properties: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        ports: tuple[int, int, int] | None = None,
        token_auth: bool = False,
    ) -> None:
        """`token_auth`: keep TorchServe 0.12's token authorization on (it writes key_file.json in
        `workdir`); off by default so tests and demos call the APIs without keys."""
        self.model_store = Path(model_store).resolve()
        self.models = list(models)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tsgpu-ts-")).resolve()
        self.log_dir = self.workdir / "logs"
        self.tmp_dir = self.workdir / "tmp"
        inference, management, metrics = ports or (free_port(), free_port(), free_port())
        self.grpc_ports = (free_port(), free_port())
        self.inference_url = f"http://{LOOPBACK}:{inference}"
        self.management_url = f"http://{LOOPBACK}:{management}"
        self.metrics_url = f"http://{LOOPBACK}:{metrics}"
        props = read_properties(Path(base_config)) if base_config else {}
        props.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            # gRPC listens too (7070/7071 by default): a second instance would fail to bind and stop
            "grpc_inference_address": LOOPBACK,
            "grpc_management_address": LOOPBACK,
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            "model_store": str(self.model_store),
            "load_models": ",".join(self.models),
            # worker sockets and unpacked archives go to java.io.tmpdir, not $TMPDIR
            "vmargs": f"{props.get('vmargs', '')} -Djava.io.tmpdir={self.tmp_dir}".strip(),
        })
        props.update(properties or {})
        self.properties = props
        self.extra_env = dict(env or {})
        self.token_auth = token_auth
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> TorchServe:
        for d in (self.log_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties.items()))
        java = find_java()
        env = java.env()
        env.update({
            "TMPDIR": str(self.tmp_dir),
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
        })
        env.update(self.extra_env)
        cmd = [
            torchserve_executable(), "--start", "--foreground", "--ncs",
            "--ts-config", str(config), "--model-store", str(self.model_store),
        ]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        self._log_file = open(self.log_dir / "torchserve.out", "wb")
        self.process = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)  # stray workers of the group
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cleanup(self) -> None:
        """Remove the working directory if this object created it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- readiness and inspection ----------------------------------------------------------------

    def wait_ready(self, models: Iterable[str] | None = None, timeout: float = 180.0) -> None:
        """Block until every worker of each model is READY; raise with the log tail otherwise."""
        names = list(models) if models is not None else [m for m in self.models if m != "all"]
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"torchserve exited (code {self.process and self.process.returncode})\n{self.log_tail()}")
            for name in list(pending):
                if self._model_ready(name):
                    pending.discard(name)
                elif self._load_failed(name):
                    raise ServerError(f"model {name!r} failed to load\n{self.log_tail()}")
            if pending and time.monotonic() > deadline:
                raise ServerError(f"models {sorted(pending)} not ready after {timeout:.0f}s\n{self.log_tail()}")
            if pending:
                time.sleep(0.5)

    def _model_ready(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.management_url}/models/{name}", timeout=5) as r:
                info = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        if not info:
            return False
        model = info[0]
        workers = model.get("workers", [])
        wanted = max(1, int(model.get("minWorkers", 1)))
        return len([w for w in workers if w.get("status") == "READY"]) >= wanted

    def _load_failed(self, name: str) -> bool:
        log = self.log_dir / "ts_log.log"
        if not log.is_file():
            return False
        text = log.read_text(errors="replace")
        # The frontend retries a dying worker forever; three failures is not a transient hiccup.
        return text.count(f"Load model failed: {name},") >= 3

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("model_log.log", "ts_log.log", "torchserve.out"):
            path = self.log_dir / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def worker_pids(self) -> list[int]:
        """PIDs of this server's Python workers (from the management API)."""
        pids = []
        try:
            with urllib.request.urlopen(f"{self.management_url}/models", timeout=5) as r:
                names = [m["modelName"] for m in json.loads(r.read()).get("models", [])]
            for name in names:
                with urllib.request.urlopen(f"{self.management_url}/models/{name}", timeout=5) as r:
                    for w in json.loads(r.read())[0].get("workers", []):
                        if w.get("pid"):
                            pids.append(int(w["pid"]))
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
            pass
        return pids


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
