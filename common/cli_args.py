"""Argument checks shared by the command lines (shard_tool, edge_agent, basestation).

A bad argument is one line on stderr and exit 2, found while parsing, before torch is imported
and before any file or socket is touched: numbers are finite and within their range, endpoints
are ZeroMQ's `tcp://HOST:PORT` with a port that exists (libzmq binds port 99999 as 34463 and -1
as 65535 without a word, measured on 4.3.5), devices are ones torch can name.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

EXIT_USAGE = 2
MAX_PORT = 65535
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message (see prog --help)`, not the
    usage block and then the message; subcommand parsers are built with the same class."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(low: float | None = None, high: float | None = None, *, above: bool = False,
           integer: bool = False):
    """An argparse `type`: a finite number >= low (> low with `above`) and <= high."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if above else '>='} {_plain(low)}")
    if high is not None:
        bounds.append(f"<= {_plain(high)}")
    wanted = f"{'a whole number' if integer else 'a number'}{' ' if bounds else ''}" \
             f"{' and '.join(bounds)}"

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if above
                                                               else value < low)) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {wanted}")
        return value

    parse.__name__ = "number"
    return parse


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_endpoint(endpoint: str, bind: bool = False) -> str:
    """`tcp://HOST:PORT` (port 1-65535; a bind may also take `*` or 0 for any port and `*` for
    every interface), `ipc://PATH` or `inproc://NAME`. Returns it; raises ValueError."""
    port_rule = "1-65535, or * for any" if bind else "1-65535"
    wanted = f"expected tcp://HOST:PORT (port {port_rule})"
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"{endpoint!r}: {wanted}")
    if scheme != "tcp":
        if not rest:
            raise ValueError(f"{endpoint!r}: expected {scheme}://PATH")
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or not host or (host == "*" and not bind) \
            or (host.startswith("[") != host.endswith("]")):
        raise ValueError(f"{endpoint!r}: {wanted}")
    if bind and port in ("*", "0"):
        return endpoint
    if not port.isdigit() or not 1 <= int(port) <= MAX_PORT:
        raise ValueError(f"{endpoint!r}: port {port!r} is not {port_rule}")
    return endpoint


def endpoint(bind: bool = False):
    """An argparse `type` for an endpoint to connect to (or, with `bind`, to listen on)."""

    def parse(text: str) -> str:
        try:
            return check_endpoint(text, bind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "endpoint"
    return parse


def device(text: str) -> str:
    """An argparse `type`: auto, cpu, cuda or cuda:N (whether CUDA is there is checked later,
    where torch is imported)."""
    if not DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: one of auto, cpu, cuda, cuda:N")
    return text


def user_error(e: BaseException) -> str | None:
    """One line for an error the user's input or machine caused (a file, a port, a socket
    option), or None for a bug, which keeps its traceback."""
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else ""
        return f"{where}{': ' if where else ''}{e.strerror or e}"
    zmq = sys.modules.get("zmq")
    if zmq is not None and isinstance(e, zmq.ZMQError):
        return str(e)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return f"out of memory: {str(e).splitlines()[0] if str(e) else 'allocation failed'}"
    return None
