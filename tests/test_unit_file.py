"""`edge_agent --print-unit` (edge_agent/unit_file.py): a systemd unit for the same command
line, quoted so that systemd reads back exactly these arguments (its own rules: % is a
specifier, $ a variable, words unquoted and C-unescaped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from agent_fixtures import REPO_ROOT

from edge_agent.unit_file import UnitError, quote_environment, quote_exec_arg, unit_text

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed")


@pytest.mark.parametrize("arg, quoted", [
    ("--expert", "--expert"),
    ("0-3", "0-3"),
    ("tcp://10.0.0.3:5600", "tcp://10.0.0.3:5600"),
    ("/srv/shards", "/srv/shards"),
    ("my shards", '"my shards"'),
    ("100%", '"100%%"'),  # a specifier otherwise
    ("%h/shards", '"%%h/shards"'),
    ("$HOME", '"$$HOME"'),  # an environment variable otherwise
    ("${HOME}x", '"$${HOME}x"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("it's", '"it\'s"'),
    (";", '";"'),  # a lone ; would end the command
    ("", '""'),  # an empty argument stays one
    ("two\nlines", '"two\\nlines"'),
    ("bell\x07", '"bell\\x07"'),
])
def test_quote_exec_arg(arg, quoted):
    assert quote_exec_arg(arg) == quoted


def test_environment_keeps_dollars_and_escapes_percent():
    assert quote_environment("PYTHONPATH", "/opt/a b/$x%") == \
        'Environment="PYTHONPATH=/opt/a b/$x%%"'


def unit(**overrides) -> str:
    fields = dict(python="/opt/venv/bin/python", agent_args=["--expert", "0-3", "--shards",
                  "/srv/my shards"], working_dir="/srv/wdmoe", experts="0-3")
    return unit_text(**(fields | overrides))


def test_unit_contents():
    lines = unit().splitlines()
    for expected in ("[Unit]", "Description=WDMoE edge agent, experts 0-3",
                     "After=network-online.target", "Wants=network-online.target", "[Service]",
                     "WorkingDirectory=/srv/wdmoe",
                     'ExecStart=/opt/venv/bin/python -m edge_agent --expert 0-3 --shards '
                     '"/srv/my shards"',
                     "Environment=PYTHONUNBUFFERED=1", "Restart=on-failure", "RestartSec=2",
                     "[Install]", "WantedBy=multi-user.target"):
        assert expected in lines
    assert not any(line.startswith(("User=", "Environment=PYTHONPATH")) for line in lines)
    lines = unit(source_root="/src/wdmoe", user="jetson", working_dir="/home/j/100%").splitlines()
    assert {"Environment=PYTHONPATH=/src/wdmoe", "User=jetson",
            "WorkingDirectory=/home/j/100%%"} <= set(lines)


def test_values_a_unit_cannot_carry_are_refused():
    with pytest.raises(UnitError, match="absolute path"):
        unit(python="python3")
    with pytest.raises(UnitError, match="line break"):
        unit(working_dir="/srv/a\nb")


@needs_systemd_analyze
def test_systemd_accepts_a_unit_with_awkward_arguments(tmp_path):
    path = tmp_path / "edge-agent.service"
    path.write_text(unit(python=sys.executable, working_dir=str(tmp_path),
                         agent_args=["--shards", "a b/100%", "--id", "$USER's \"box\"\\1",
                                     "--fault", ";", ""]))
    verify(path)


@pytest.mark.integration
def test_print_unit_prints_the_command_line_and_starts_nothing(tmp_path):
    args = ["--expert", "0-3", "--shards", "my shards", "--bind", "tcp://127.0.0.1:5600",
            "--print-u"]  # an abbreviation argparse takes: left in, the unit would only print
    done = subprocess.run([sys.executable, "-m", "edge_agent", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no "serving", no log: nothing started
    lines = done.stdout.splitlines()
    assert (f"ExecStart={sys.executable} -m edge_agent --expert 0-3 --shards \"my shards\" "
            "--bind tcp://127.0.0.1:5600") in lines
    assert f"WorkingDirectory={tmp_path}" in lines  # relative paths keep their meaning
    assert f"Environment=PYTHONPATH={REPO_ROOT}" in lines  # run from elsewhere, it still imports
    assert "Description=WDMoE edge agent, experts 0,1,2,3" in lines
    if SYSTEMD_ANALYZE:
        path = tmp_path / "edge-agent.service"
        path.write_text(done.stdout)
        verify(path)
    # what the agent would refuse at start is refused here too: one line, exit 2
    refused = subprocess.run([sys.executable, "-m", "edge_agent", "--expert", "0-3",
                              "--shards", "x", "--print-unit"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--bind tcp://0.0.0.0:5600 is reachable" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and refused.stdout == ""


def verify(path) -> None:
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="info"))
    assert done.returncode == 0, done.stderr
    assert path.name not in done.stderr, done.stderr  # no complaint about this unit's lines
