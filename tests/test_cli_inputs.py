"""Bad input to every command, as a user would type it: one line on stderr, a non-zero exit,
never a traceback, never a hang, nothing left behind (issue #13).

Each case runs the real console command as a process with a deadline. `before` says what the
case did before the fix: a traceback, a hang, or running on with the input silently taken to
mean something else (a port past 65535 bound as port % 65536, `--max-message-mb -1` as "no
cap", a prompt past the context generating garbage).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
import zmq
from agent_fixtures import free_port, start_agent  # noqa: F401

from wire import protocol as P

DEADLINE_S = 60  # a case that takes longer is a hang
NOBODY = "tcp://127.0.0.1:9"  # discard port: nothing answers ZeroMQ there


def bs_generate(*extra: str) -> tuple[str, ...]:
    return ("basestation", "generate", "--shards", "{split}", "--agent", f"0-7={NOBODY}",
            "--wait-s", "1", "--prompt", "hello", *extra)


def agent(*extra: str) -> tuple[str, ...]:
    return ("edge_agent", "--expert", "0", "--shards", "{split}", "--no-self-benchmark",
            *extra)


# id: (argv with {split} {checkpoint} {file} {dir} {busy} filled in, a fragment of the one
# line, what it did before)
CASES = {
    # shard_tool
    "split OUT under a file": (("shard_tool", "split", "{checkpoint}", "{file}/out"),
                               "{file}", "traceback (FileExistsError)"),
    "split --dtype bogus": (("shard_tool", "split", "{checkpoint}", "{dir}/out", "--dtype",
                             "bogus"),
                            "argument --dtype", "usage block: 5 lines"),
    "push --to notanendpoint": (("shard_tool", "push", "{split}", "--expert", "0", "--to",
                                 "notanendpoint"), "--to 'notanendpoint'",
                                "traceback (ZMQError)"),
    "push --to tcp://host": (("shard_tool", "push", "{split}", "--expert", "0", "--to",
                              "tcp://host"), "expected tcp://HOST:PORT", "traceback (ZMQError)"),
    "push --to port 99999": (("shard_tool", "push", "{split}", "--expert", "0", "--to",
                              "tcp://127.0.0.1:99999"), "port '99999'",
                             "15 s wait, then 'no answer'"),
    "push --chunk-mb nan": (("shard_tool", "push", "{split}", "--expert", "0", "--to", NOBODY,
                             "--chunk-mb", "nan"), "--chunk-mb nan", "traceback (ValueError)"),
    "push --chunk-mb -1": (("shard_tool", "push", "{split}", "--expert", "0", "--to", NOBODY,
                            "--chunk-mb", "-1"), "--chunk-mb -1", "15 s wait, then 'no answer'"),
    "push --timeout-s nan": (("shard_tool", "push", "{split}", "--expert", "0", "--to", NOBODY,
                              "--timeout-s", "nan"), "--timeout-s nan",
                             "'no answer within nan s'"),
    "push --expert x": (("shard_tool", "push", "{split}", "--expert", "x", "--to", NOBODY),
                        "--expert 'x'", "ok already"),
    "push --timeout-s 1e17": (("shard_tool", "push", "{split}", "--expert", "0", "--to", NOBODY,
                               "--timeout-s", "1e17"), "--timeout-s 1e+17",
                              "traceback (OverflowError in the socket's timeout)"),
    "push --expert 0-50000000": (("shard_tool", "push", "{split}", "--expert", "0-50000000",
                                  "--to", NOBODY), "expert ids go up to 4095",
                                 "a set of 50 million ids first"),
    "verify a file": (("shard_tool", "verify", "{file}"), "manifest.json", "ok already"),
    # edge_agent
    "agent --bind port 99999": (agent("--bind", "tcp://127.0.0.1:99999"), "port '99999'",
                                "served on port 34463"),
    "agent --bind tcp://127.0.0.1": (agent("--bind", "tcp://127.0.0.1"),
                                     "expected tcp://HOST:PORT",
                                     "'reachable beyond this machine'"),
    "agent --advertise junk": (agent("--bind", "tcp://127.0.0.1:0", "--advertise", "junk"),
                               "argument --advertise", "advertised 'junk'"),
    "agent port in use": (agent("--bind", "tcp://127.0.0.1:{busy}"), "Address already in use",
                          "ok already"),
    "agent --device bogus": (agent("--bind", "tcp://127.0.0.1:0", "--device", "bogus"),
                             "argument --device", "traceback (RuntimeError)"),
    "agent --dtype bogus": (agent("--bind", "tcp://127.0.0.1:0", "--dtype", "bogus"),
                            "unknown dtype 'bogus'", "ok already"),
    "agent --heartbeat-timeout-s nan": (agent("--heartbeat-timeout-s", "nan"),
                                        "argument --heartbeat-timeout-s",
                                        "traceback (ValueError)"),
    "agent --heartbeat-timeout-s -1": (agent("--heartbeat-timeout-s", "-1"),
                                       "argument --heartbeat-timeout-s",
                                       "'cannot use …: Invalid argument'"),
    "agent --max-message-mb -1": (agent("--bind", "tcp://127.0.0.1:0", "--max-message-mb",
                                        "-1"), "argument --max-message-mb",
                                  "served with no message cap"),
    "agent --max-message-mb 1e30": (agent("--max-message-mb", "1e30"),
                                     "argument --max-message-mb", "traceback (OverflowError)"),
    "agent --fault delay=nan": (agent("--bind", "tcp://127.0.0.1:0", "--fault", "delay=nan"),
                                "--fault 'delay=nan'", "served; sleep(NaN) at its first request"),
    "agent --expert 0-x": (("edge_agent", "--expert", "0-x", "--shards", "{split}", "--bind",
                            "tcp://127.0.0.1:0"), "--expert '0-x'", "ok already"),
    "agent --expert 0-50000000": (("edge_agent", "--expert", "0-50000000", "--shards",
                                   "{split}", "--bind", "tcp://127.0.0.1:0"),
                                  "expert ids go up to 4095", "17-26 s, then its error"),
    "agent --store on a file": (("edge_agent", "--expert", "0", "--store", "{file}", "--bind",
                                 "tcp://127.0.0.1:0"), "not a folder",
                                "traceback (NotADirectoryError)"),
    "agent --store under a file": (("edge_agent", "--expert", "0", "--store", "{file}/store",
                                    "--bind", "tcp://127.0.0.1:0"), "Not a directory",
                                   "traceback (NotADirectoryError)"),
    # basestation
    "generate --agent tcp://host": (("basestation", "generate", "--shards", "{split}",
                                     "--agent", "0-7=tcp://host", "--prompt", "hi"),
                                    "agent 'tcp://host'", "traceback (ZMQError)"),
    "generate --agent port 99999": (("basestation", "generate", "--shards", "{split}",
                                     "--agent", "0-7=tcp://127.0.0.1:99999", "--prompt", "hi"),
                                    "port '99999'", "dialled port 34463, waited --wait-s"),
    "generate roster with wrong types": (("basestation", "generate", "--shards", "{split}",
                                          "--agents", "{dir}/types.toml", "--prompt", "hi"),
                                         "types.toml: agent '0-7'", "ok already"),
    "generate roster port 0": (("basestation", "generate", "--shards", "{split}", "--agents",
                                "{dir}/port0.toml", "--prompt", "hi"), "port '0'",
                               "dialled port 0, waited --wait-s"),
    "generate --agent 0-50000000": (("basestation", "generate", "--shards", "{split}",
                                     "--agent", f"0-50000000={NOBODY}", "--prompt", "hi"),
                                    "expert ids go up to 4095", "51 s, then MemoryError"),
    "generate a binary roster": (("basestation", "generate", "--shards", "{split}", "--agents",
                                  "{dir}/binary.toml", "--prompt", "hi"),
                                 "binary.toml: not valid TOML", "traceback (UnicodeDecodeError)"),
    "generate --temperature 1e-300": (bs_generate("--temperature", "1e-300"),
                                      "argument --temperature", "traceback (NaN in sampling)"),
    # testbed
    "make-model far too large": (("testbed", "make-model", "{dir}/model", "--experts", "100000",
                                  "--hidden", "4096"), "parameters",
                                 "built in memory until it ran out"),
    "generate --shards a file": (("basestation", "generate", "--shards", "{file}", "--agent",
                                  f"0-7={NOBODY}", "--prompt", "hi"), "manifest.json",
                                 "ok already"),
    "generate --listen port in use": (bs_generate("--listen", "tcp://127.0.0.1:{busy}"),
                                      "Address already in use", "ok already"),
    "generate --listen port 99999": (bs_generate("--listen", "tcp://127.0.0.1:99999"),
                                     "port '99999'", "listened on port 34463"),
    "generate --max-new-tokens 0": (bs_generate("--max-new-tokens", "0"),
                                    "argument --max-new-tokens", "traceback (ValueError)"),
    "generate --threads 0": (bs_generate("--threads", "0"), "argument --threads", "new option"),
    "generate --max-new-tokens -1": (bs_generate("--max-new-tokens", "-1"),
                                     "argument --max-new-tokens", "traceback (ValueError)"),
    "generate --max-new-tokens past the context": (bs_generate("--max-new-tokens", "5000"),
                                                   "context of 4096 tokens",
                                                   "ran on: 5000 tokens, exit 0"),
    "generate prompt past the context": (("basestation", "generate", "--shards", "{split}",
                                          "--agent", f"0-7={NOBODY}", "--prompt",
                                          "word " * 5000), "context of 4096 tokens",
                                         "ran on: 15001-token prompt, exit 0"),
    "generate empty prompt": (("basestation", "generate", "--shards", "{split}", "--agent",
                               f"0-7={NOBODY}", "--prompt", ""), "--prompt is empty",
                              "traceback (RuntimeError in attention)"),
    "generate --device bogus": (bs_generate("--device", "bogus"), "argument --device",
                                "traceback (RuntimeError)"),
    "generate --wire-dtype bogus": (bs_generate("--wire-dtype", "bogus"),
                                    "--wire-dtype bogus", "ok already"),
    "generate --temperature nan": (bs_generate("--temperature", "nan"),
                                   "argument --temperature", "ran greedy, exit 0"),
    "generate --temperature -1": (bs_generate("--temperature", "-1"),
                                  "argument --temperature", "ran greedy, exit 0"),
    "generate --wait-s nan": (bs_generate("--wait-s", "nan"), "argument --wait-s",
                              "traceback (ValueError)"),
    "generate --wait-s -1": (bs_generate("--wait-s", "-1"), "argument --wait-s",
                             "'after -1 s'"),
    "chat --max-new-tokens past the context": (("basestation", "chat", "--shards", "{split}",
                                                "--agent", f"0-7={NOBODY}",
                                                "--max-new-tokens", "4096"),
                                               "context of 4096 tokens",
                                               "each answer ran past the context"),
    "chat --max-new-tokens 0": (("basestation", "chat", "--shards", "{split}", "--agent",
                                 f"0-7={NOBODY}", "--max-new-tokens", "0"),
                                "argument --max-new-tokens",
                                "the first answer: traceback (ValueError)"),
    "status --agent port 99999": (("basestation", "status", "--agent",
                                   "0=tcp://127.0.0.1:99999"), "port '99999'",
                                  "a table, nothing on stderr"),
    "status --wait-s nan": (("basestation", "status", "--agent", f"0={NOBODY}", "--wait-s",
                             "nan"), "argument --wait-s", "no line, exit 1"),
    "serve --port 99999": (("basestation", "serve", "--shards", "{split}", "--agent",
                            f"0-7={NOBODY}", "--port", "99999"), "argument --port",
                           "ok already"),
    "serve --max-body-mb 0": (("basestation", "serve", "--shards", "{split}", "--agent",
                               f"0-7={NOBODY}", "--max-body-mb", "0"), "argument --max-body-mb",
                              "new flag"),
    "serve --header-timeout-s inf": (("basestation", "serve", "--shards", "{split}", "--agent",
                                      f"0-7={NOBODY}", "--header-timeout-s", "inf"),
                                     "argument --header-timeout-s", "new flag"),
}


@pytest.fixture
def places(tmp_path, tiny_split, tiny_checkpoint):
    """The placeholders of CASES, in a fresh folder each time; a port held by a listener."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "types.toml").write_text('[agents]\n"0-7" = 5\n')
    (tmp_path / "port0.toml").write_text('[agents]\n"0-7" = "tcp://127.0.0.1:0"\n')
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 4)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"split": tiny_split, "checkpoint": tiny_checkpoint,
           "file": str(tmp_path / "a-file"), "dir": str(tmp_path),
           "busy": str(busy.getsockname()[1])}
    busy.close()


def assert_one_line(result, fragment: str, elapsed_s: float) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr, result.stdout[-400:])
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert elapsed_s < DEADLINE_S
    return lines[0]


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=() if CASES[name][0][0] in ("shard_tool", "testbed")
                 else pytest.mark.integration)  # a second or two each: torch is imported
    for name in CASES])
def test_bad_input_is_one_line(case, places, run_cli):
    argv, fragment, _before = CASES[case]
    argv = [arg.format(**places) for arg in argv]
    fragment = fragment.format(**places)
    before = sorted(os.listdir(places["dir"]))
    start_s = time.monotonic()
    result = run_cli(*argv, timeout_s=DEADLINE_S, stdin=subprocess.DEVNULL)
    assert_one_line(result, fragment, time.monotonic() - start_s)
    assert sorted(os.listdir(places["dir"])) == before  # nothing half written


@pytest.mark.integration
def test_push_chunk_mb_zero_to_a_live_agent_is_refused(start_agent, tiny_split, tmp_path,
                                                       run_cli):
    """Regression: `--chunk-mb 0` sent empty chunks to a real `--store` agent forever (killed
    after 20 s: no progress, no exit)."""
    agent = start_agent("--expert", "0", "--store", str(tmp_path / "store"), "--bind",
                        "tcp://127.0.0.1:*", "--no-self-benchmark", ready="edge_agent waiting")
    start_s = time.monotonic()
    result = run_cli("shard_tool", "push", tiny_split, "--expert", "0", "--to", agent.endpoint,
                     "--chunk-mb", "0", timeout_s=DEADLINE_S)
    assert_one_line(result, "--chunk-mb 0", time.monotonic() - start_s)
    assert not os.listdir(tmp_path / "store" / "experts")  # nothing received


class NeverPongs:
    """A dial-in 'agent' that announces itself, answers INFO, and never answers a PING."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"never-pongs")
        sock.connect(self.endpoint)
        info = {"serving": True, "experts": [0], "fingerprint": "x", "device": "cpu"}
        sock.send(P.pack(P.HELLO, 0, info=info))
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    header = P.unpack(sock.recv_multipart()[0])
                    if header["kind"] == P.INFO:
                        sock.send(P.pack(P.INFO_REPLY, header["id"], info=info))
        finally:
            sock.close()
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.integration
def test_status_against_a_dial_in_that_never_pongs(run_cli):
    """Regression: `status --listen` with a dial-in that answered INFO but never PING ended in
    a traceback (TimeoutError). Now: its row says NO, one line on stderr, exit 1."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    fake = NeverPongs(endpoint)
    try:
        start_s = time.monotonic()
        result = run_cli("basestation", "status", "--listen", endpoint, "--wait-s", "3",
                         timeout_s=DEADLINE_S)
        elapsed_s = time.monotonic() - start_s
    finally:
        fake.stop()
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "basestation status: 1 of 1 agents did not answer within 3 s"]
    row = result.stdout.splitlines()[1]
    assert row.startswith("never-pongs") and " NO " in row
    assert elapsed_s < 30  # wait-s for HELLO and INFO, 1 s for the first PING: bounded
