"""Why an agent is silent (wire/handshake_check.py) and what `basestation status` prints for it:
every key mismatch against real agent processes gives its own hint, a dead endpoint none.
Before, all of them read "did not answer" with no hint. Also the agent's own log of a peer
that leaves: a normal push used to end in "peer disconnected … or a frame over the cap"."""

from __future__ import annotations

import re

import pytest
import zmq
from agent_fixtures import free_port, start_agent, start_module_agent  # noqa: F401
from waiting import wait_until

from shard_tool.push import push
from wire import handshake_check as H
from wire.keys import PUSHERS_DIR, TRUSTED_DIR, keygen, load_keypair, trust

LOG_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> key folder: a base station, a stranger, and an agent that trusts the base
    station only."""
    root = tmp_path_factory.mktemp("handshake-keys")
    folders = {name: str(root / name) for name in ("bs", "stranger", "agent")}
    for name, folder in folders.items():
        keygen(folder, name, (TRUSTED_DIR, PUSHERS_DIR) if name == "agent" else (TRUSTED_DIR,))
    trust(folders["agent"], load_keypair(folders["bs"]).path.removesuffix("_secret"))
    return folders


@pytest.fixture(scope="module")
def agents(start_module_agent, tiny_split, keys):
    """"keyed": CurveZMQ, trusting the base station; "plain": no keys (loopback)."""
    return {"keyed": start_module_agent("--expert", "0-3", "--shards", tiny_split, "--bind",
                                        "tcp://127.0.0.1:*", "--keys", keys["agent"],
                                        "--no-self-benchmark"),
            "plain": start_module_agent("--expert", "4-7", "--shards", tiny_split, "--bind",
                                        "tcp://127.0.0.1:*", "--no-self-benchmark")}


# -- the decision, by hand (no sockets) ---------------------------------------------------------

@pytest.mark.parametrize("mechanism, curve, event, value, hint", [
    (None, False, None, 0, None),  # no greeting: nothing learned
    (None, True, None, 0, None),
    (H.NOT_ZMTP, False, None, 0, H.HINT_NOT_ZMTP),
    ("CURVE", False, None, 0, H.HINT_NEEDS_CURVE),
    ("NULL", True, None, 0, H.HINT_AGENT_IS_PLAIN),
    ("NULL", False, None, 0, H.HINT_LINK_UP),
    ("CURVE", True, zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, H.HINT_REFUSED_OUR_KEY),
    ("CURVE", True, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, H.HINT_WRONG_SERVER_KEY),
    ("CURVE", True, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC,
     H.HINT_WRONG_SERVER_KEY),
    ("CURVE", True, zmq.EVENT_HANDSHAKE_SUCCEEDED, 0, H.HINT_LINK_UP),
    ("CURVE", True, None, 0, None),  # no handshake outcome by the deadline
])
def test_hint_for(mechanism, curve, event, value, hint):
    assert H.hint_for(mechanism, curve, event, value) == hint


def test_another_mechanism_is_named():
    assert "PLAIN" in H.hint_for("PLAIN", False)


# -- real agents ------------------------------------------------------------------------------

@pytest.mark.integration
def test_each_key_mismatch_gets_its_hint(agents, keys):
    keyed, plain = agents["keyed"].endpoint, agents["plain"].endpoint
    bs, stranger = load_keypair(keys["bs"]), load_keypair(keys["stranger"])
    agent_key = load_keypair(keys["agent"]).public
    assert H.read_mechanism(keyed, 5.0) == "CURVE" and H.read_mechanism(plain, 5.0) == "NULL"
    assert H.diagnose(keyed, None, None) == H.HINT_NEEDS_CURVE  # no keys at all
    assert H.diagnose(keyed, bs, None) == H.HINT_NEEDS_CURVE  # keys, but none for the agent
    assert H.diagnose(keyed, stranger, agent_key) == H.HINT_REFUSED_OUR_KEY
    assert H.diagnose(keyed, bs, bs.public) == H.HINT_WRONG_SERVER_KEY
    assert H.diagnose(plain, bs, agent_key) == H.HINT_AGENT_IS_PLAIN
    assert H.diagnose(keyed, bs, agent_key) == H.HINT_LINK_UP  # keys right: not a key problem
    assert H.diagnose(plain, None, None) == H.HINT_LINK_UP
    assert agents["keyed"].alive() and agents["plain"].alive()


@pytest.mark.integration
def test_a_dead_endpoint_gives_no_hint():
    assert H.diagnose(f"tcp://127.0.0.1:{free_port()}", None, None, timeout_s=5.0) is None
    assert H.diagnose("tcp://no-such-host.invalid:5600", None, None, timeout_s=5.0) is None
    assert H.diagnose("inproc://nothing", None, None, timeout_s=5.0) is None


@pytest.mark.integration
def test_status_prints_the_hint_on_the_silent_agents_line(agents, keys, run_cli):
    keyed, plain = agents["keyed"].endpoint, agents["plain"].endpoint
    dead = f"tcp://127.0.0.1:{free_port()}"
    agent_key = load_keypair(keys["agent"]).public.decode()
    # the keyed agent named without its key, the plain one with a key, and a dead one
    done = run_cli("basestation", "status", "--keys", keys["bs"], "--wait-s", "2",
                   "--agent", f"0-3={keyed}", "--agent", f"4-7={plain}@{agent_key}",
                   "--agent", f"8={dead}")
    assert done.returncode == 1 and "3 of 3 agents did not answer" in done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert rows[keyed].endswith(H.HINT_NEEDS_CURVE)
    assert rows[plain].endswith(H.HINT_AGENT_IS_PLAIN)
    assert rows[dead].split()[1:] == ["NO", "-", "-", "-", "-", "-"]  # nothing learned
    # our key is not in the agent's trusted/ folder
    done = run_cli("basestation", "status", "--keys", keys["stranger"], "--wait-s", "2",
                   "--agent", f"0-3={keyed}@{agent_key}")
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].endswith(H.HINT_REFUSED_OUR_KEY)


# -- the agent's log when a peer leaves ---------------------------------------------------------

@pytest.mark.integration
def test_a_normal_push_logs_no_cap(start_agent, tiny_split, tmp_path):
    agent = start_agent("--expert", "3", "--store", str(tmp_path / "store"), "--bind",
                        "tcp://127.0.0.1:*", "--no-self-benchmark", ready="edge_agent waiting")
    assert push(tiny_split, 3, agent.endpoint, chunk_bytes=64 * 1024).serving
    wait_until(lambda: "peer disconnected on" in agent.stderr(), LOG_TIMEOUT_S,
               interval_s=0.05, what=lambda: f"a disconnect line in:\n{agent.stderr()}")
    assert not re.search(r"\bcap\b", agent.stderr()), agent.stderr()
