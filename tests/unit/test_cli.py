"""The `tsgpu` command line (archiver_scripts/cli.py): one flag name, one meaning, across commands.

`tsgpu archive --config KEY=VALUE` sets handler config; the file torchserve reads is `tsgpu serve
--ts-config FILE` (torchserve's own name). `serve --config FILE` is still accepted, with a note.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archiver_scripts import java, server
from archiver_scripts.cli import main


@pytest.fixture
def serve_command(monkeypatch):
    """Run `tsgpu serve ...` without Java or torchserve: the command it would exec, captured."""
    runtime = java.JavaRuntime(Path("/opt/jdk"), 17, "PATH")
    monkeypatch.setattr(java, "find_java", lambda: runtime)
    monkeypatch.setattr(server, "torchserve_executable", lambda: "torchserve")
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: execs.append(list(args)))

    def run(*argv: str) -> list[str]:
        assert main(["serve", *argv]) == 0
        [cmd] = execs[-1:]
        return cmd

    return run


def ts_config_of(cmd: list[str]) -> str:
    return cmd[cmd.index("--ts-config") + 1]


def test_serve_takes_the_torchserve_config_file_as_ts_config(serve_command, capsys):
    assert ts_config_of(serve_command()) == "config.properties"
    assert ts_config_of(serve_command("--ts-config", "my.properties")) == "my.properties"
    assert "deprecated" not in capsys.readouterr().err


def test_serve_config_still_works_with_a_one_line_deprecation_note(serve_command, capsys):
    assert ts_config_of(serve_command("--config", "old.properties")) == "old.properties"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config is deprecated, use --ts-config" in err[0]


def test_config_means_key_value_only_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve_help = capsys.readouterr().out
    assert "--ts-config FILE" in serve_help and "--config" not in serve_help.replace("--ts-config", "")
    with pytest.raises(SystemExit):
        main(["archive", "--help"])
    assert "--config KEY=VALUE" in capsys.readouterr().out
