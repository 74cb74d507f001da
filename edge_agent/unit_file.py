"""`edge_agent … --print-unit`: a systemd unit that starts this same agent on boot and again
after a crash. Pure text building; the CLI passes in the command line, paths and names."""

from __future__ import annotations

import re

RESTART_SEC_S = 2  # a crash-looping agent restarts at most every 2 s
# Arguments made only of these need no quotes in ExecStart= (systemd.service(5), "Command
# lines"); anything else is double-quoted and escaped.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_./:=,+@-]+", re.ASCII)
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


class UnitError(ValueError):
    """A value systemd cannot carry in a unit file (one line for the user)."""


def escape_specifiers(text: str) -> str:
    """systemd expands %x specifiers in most settings: a literal % is written %%."""
    return text.replace("%", "%%")


def quote_exec_arg(arg: str) -> str:
    """One word of ExecStart= as systemd reads it back to exactly `arg`: % -> %% (specifiers),
    $ -> $$ (environment variables), and, unless it is a plain word, double quotes with C-style
    escapes (systemd unquotes and unescapes each word)."""
    text = escape_specifiers(arg).replace("$", "$$")
    if _PLAIN_WORD_RE.fullmatch(arg):
        return text
    escaped = "".join(_escape_char(c) for c in text)
    return f'"{escaped}"'


def _escape_char(c: str) -> str:
    if c in _C_ESCAPES:
        return _C_ESCAPES[c]
    if c.isprintable():
        return c
    # other control characters as their UTF-8 bytes: systemd's C unescaping reads \xNN
    return "".join(f"\\x{b:02x}" for b in c.encode())


def _setting_value(name: str, value: str) -> str:
    """A path or text for a one-line setting (WorkingDirectory=, Description=, User=)."""
    if "\n" in value or "\r" in value:
        raise UnitError(f"{name}: {value[:60]!r} holds a line break, which a unit file cannot")
    return escape_specifiers(value)


def unit_text(*, python: str, agent_args: list[str], working_dir: str, experts: str,
              source_root: str | None = None, user: str | None = None) -> str:
    """The unit file: `python -m edge_agent AGENT_ARGS` run in `working_dir` (so relative paths
    in the arguments mean what they meant here), restarted on failure, after the network is
    up. `experts`: for Description=; `source_root`: put on PYTHONPATH when the package is not
    installed; `user`: User= (None: root, systemd's default). Raises UnitError."""
    if not python.startswith("/"):  # a leading @ - + ! : would be an ExecStart= prefix
        raise UnitError(f"{python!r}: the interpreter must be an absolute path")
    exec_start = " ".join(quote_exec_arg(a) for a in [python, "-m", "edge_agent", *agent_args])
    lines = [
        "# Written by `edge_agent --print-unit`. Install it with:",
        "#   sudo tee /etc/systemd/system/edge-agent.service < this-file",
        "#   sudo systemctl daemon-reload && sudo systemctl enable --now edge-agent",
        "[Unit]",
        f"Description={_setting_value('Description', f'WDMoE edge agent, experts {experts}')}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_setting_value('WorkingDirectory', working_dir)}",
        f"ExecStart={exec_start}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if source_root is not None:
        lines.append(quote_environment("PYTHONPATH", source_root))
    if user is not None:
        lines.append(f"User={_setting_value('User', user)}")
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC_S}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def quote_environment(name: str, value: str) -> str:
    """An Environment= line setting `name` to exactly `value` (quoted like an ExecStart= word,
    but `$` stays: Environment= does not expand variables)."""
    return f"Environment={quote_exec_arg(f'{name}={value}').replace('$$', '$')}"
