"""`basestation chat` driven through a pseudo-terminal, as a person would."""

from __future__ import annotations

import os
import signal
import sys

import pexpect
import pytest
from agent_fixtures import REPO_ROOT, start_module_agent, two_agents  # noqa: F401

pytestmark = pytest.mark.integration
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def chat(two_agents, tiny_split):
    child = pexpect.spawn(sys.executable, ["-m", "basestation", "chat", "--shards", tiny_split,
                                           *[a for flag in two_agents for a in ("--agent", flag)],
                                           "--max-new-tokens", "12", "--ignore-eos"],
                          cwd=REPO_ROOT, encoding="utf-8", timeout=TIMEOUT_S,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    child.expect("connected to 2 agents")
    yield child
    child.terminate(force=True)


def test_chat_session(chat):
    chat.expect_exact("you> ")
    chat.sendline("What does the queue module do?")
    chat.expect_exact("bot> ")
    chat.expect(r"\[12 tokens, [\d.]+ tokens/s, mean token latency [\d.]+ ms, "
                r"experts dropped 0 \(0\.0 %\)\]")

    chat.expect_exact("you> ")
    chat.sendline("/theta 0.45")
    chat.expect_exact("theta = 0.45")
    chat.expect_exact("you> ")
    chat.sendline("/theta 7")
    chat.expect_exact("usage: /theta X")
    chat.expect_exact("you> ")
    chat.sendline("/temperature 0")
    chat.expect_exact("temperature = 0")
    chat.expect_exact("you> ")
    chat.sendline("/temperature hot")
    chat.expect_exact("usage: /temperature X")
    chat.expect_exact("you> ")
    chat.sendline("/temperature default")
    chat.expect_exact("temperature = the model's default")

    chat.expect_exact("you> ")
    chat.sendline("Tell me more.")
    # with k = 2, theta >= 0.5 always drops; 0.45 drops wherever kappa <= 0.45
    chat.expect(r"\[12 tokens, .* experts dropped (\d+)")
    assert int(chat.match.group(1)) > 0

    chat.expect_exact("you> ")
    chat.sendline("/stats")
    chat.expect("agent +experts +alive")
    chat.expect(r"session: 24 tokens, [\d.]+ tokens/s, drop rate [\d.]+ %, lost to faults 0, "
                r"theta 0.45")

    chat.expect_exact("you> ")
    chat.sendline("/devices")
    chat.expect(r"tcp://127\.0\.0\.1:\d+ +0,1,2,3 +yes")

    chat.expect_exact("you> ")
    chat.sendline("/reset")
    chat.expect_exact("conversation cleared")

    # Ctrl-C at the prompt does not end the session
    chat.expect_exact("you> ")
    chat.sendintr()
    chat.expect_exact("you> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_an_answer_not_the_session(start_module_agent, tiny_split):
    slow = start_module_agent("--expert", "0-7", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*", "--fault", "delay=0.05")
    child = pexpect.spawn(sys.executable, ["-m", "basestation", "chat", "--shards", tiny_split,
                                           "--agent", f"0-7={slow.endpoint}",
                                           "--max-new-tokens", "200", "--ignore-eos"],
                          cwd=REPO_ROOT, encoding="utf-8", timeout=TIMEOUT_S)
    try:
        child.expect_exact("you> ")
        child.sendline("Go on forever.")
        child.expect_exact("bot> ")
        child.expect(r"\S")  # the first streamed text
        child.kill(signal.SIGINT)
        child.expect(r"interrupted\]")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.terminate(force=True)
