"""CurveZMQ on every link (wire/keys.py): keygen, who may talk to whom, and the refusal to
bind beyond loopback without keys. Real agent processes and sockets for the links."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import zmq.auth
from agent_fixtures import start_agent, start_module_agent  # noqa: F401
from test_agent_math import assert_close_rel
from waiting import wait_until

from basestation.discovery import open_links
from basestation.roster import (
    RosterAgent,
    RosterError,
    build_roster,
    format_roster,
    read_roster_agents,
    read_roster_file,
    read_roster_keys,
)
from common.errors import ShardError
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.push import push
from wire import protocol as P
from wire.client import AgentClient, AgentError, PeerUnreachable
from wire.keys import (
    PUSHERS_DIR,
    TRUSTED_DIR,
    KeysError,
    is_loopback_endpoint,
    keygen,
    load_key_folder,
    load_keypair,
    trust,
)

SILENCE_S = 1.5  # how long a refused client waits before calling it "no answer"
HELLO_TIMEOUT_S = 30.0
PROMPT = "Return the list of items in the queue."


def make_identity(root, name: str, agent: bool = False) -> str:
    folder = str(root / name)
    keygen(folder, name, (TRUSTED_DIR, PUSHERS_DIR) if agent else (TRUSTED_DIR,))
    return folder


def public_cert(folder: str) -> str:
    return load_keypair(folder).path.removesuffix("_secret")


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """Key folders: a base station, an untrusted one, a pusher, agents a (experts 0-3) and b
    (4-7) that trust the base station only."""
    root = tmp_path_factory.mktemp("keys")
    made = {name: make_identity(root, name, agent=name.startswith("agent"))
            for name in ("bs", "stranger", "pusher", "agent-a", "agent-b")}
    for agent in ("agent-a", "agent-b"):
        trust(made[agent], public_cert(made["bs"]))
    return made


def keypair(ids, name):
    return load_keypair(ids[name])


@pytest.fixture(scope="module")
def keyed_agents(start_module_agent, tiny_split, ids):
    """name -> agent process: experts 0-3 under key agent-a, 4-7 under agent-b."""
    return {name: start_module_agent("--expert", experts, "--shards", tiny_split, "--bind",
                                     "tcp://127.0.0.1:*", "--keys", ids[name],
                                     "--no-self-benchmark")
            for name, experts in (("agent-a", "0-3"), ("agent-b", "4-7"))}


def assert_silent(client: AgentClient, peer: bytes) -> None:
    with pytest.raises((TimeoutError, PeerUnreachable)):
        client.info(peer, timeout_s=SILENCE_S)


# -- keys and rosters (no processes but the CLIs) ---------------------------------------------

@pytest.mark.integration
def test_keygen_writes_loadable_certificates(tmp_path, run_cli):
    done = run_cli("edge_agent", "keygen", str(tmp_path / "a"), "--name", "edge-a")
    assert done.returncode == 0, done.stderr
    public, secret = zmq.auth.load_certificate(tmp_path / "a" / "edge-a.key_secret")
    assert len(public) == 40 and secret is not None and len(secret) == 40
    assert zmq.auth.load_certificate(tmp_path / "a" / "edge-a.key") == (public, None)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "edge-a.key_secret").st_mode) == 0o600
    assert (tmp_path / "a" / TRUSTED_DIR).is_dir() and (tmp_path / "a" / PUSHERS_DIR).is_dir()
    folder = load_key_folder(str(tmp_path / "a"))
    assert folder.keypair.public == public and not folder.admitted
    done = run_cli("basestation", "keygen", str(tmp_path / "bs"), "--name", "bs")
    assert done.returncode == 0, done.stderr
    assert load_keypair(str(tmp_path / "bs")).public == \
        zmq.auth.load_certificate(tmp_path / "bs" / "bs.key")[0]
    # admitting a peer copies its public part only
    path = trust(str(tmp_path / "a"), str(tmp_path / "bs" / "bs.key_secret"), PUSHERS_DIR)
    assert zmq.auth.load_certificate(path)[1] is None
    assert load_key_folder(str(tmp_path / "a")).pushers == {
        load_keypair(str(tmp_path / "bs")).public}


@pytest.mark.integration
def test_keygen_refuses_an_existing_key_without_traceback(tmp_path, run_cli):
    folder = tmp_path / "a"
    assert run_cli("edge_agent", "keygen", str(folder), "--name", "edge-a").returncode == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for tool in ("edge_agent", "basestation"):
        for name in ("edge-a", "other"):  # the same files; a second identity in one folder
            done = run_cli(tool, "keygen", str(folder), "--name", name)
            assert done.returncode == 2 and "Traceback" not in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    # a stray public certificate with that name: refused, and no secret written beside it
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "edge-b.key").write_text("not mine\n")
    with pytest.raises(KeysError, match="exists"):
        keygen(str(tmp_path / "b"), "edge-b")
    assert os.listdir(tmp_path / "b") == ["edge-b.key"]


def test_roster_entries_carry_public_keys(tmp_path, ids):
    a, b = keypair(ids, "agent-a").public, keypair(ids, "agent-b").public
    roster = tmp_path / "roster.toml"
    roster.write_text(
        '[agents]\n"0-1" = "tcp://127.0.0.1:5600"\n'
        f'"2,3" = {{ endpoint = "tcp://10.0.0.3:5600", public_key = "{a.decode()}" }}\n'
        f'"4" = {{ endpoint = "tcp://10.0.0.4:5600", certificate = '
        f'"{os.path.relpath(public_cert(ids["agent-b"]), tmp_path)}" }}\n')
    agents = read_roster_agents(str(roster))
    assert agents == [RosterAgent((0, 1), "tcp://127.0.0.1:5600"),
                      RosterAgent((2, 3), "tcp://10.0.0.3:5600", a),
                      RosterAgent((4,), "tcp://10.0.0.4:5600", b)]
    assert read_roster_file(str(roster))[0] == ((0, 1), "tcp://127.0.0.1:5600")  # the old view
    written = tmp_path / "written.toml"
    written.write_text(format_roster(agents, comment="written by the test"))
    assert read_roster_agents(str(written)) == agents
    for bad, reason in (('{ endpoint = "tcp://h:1", public_key = "short" }', "not a CURVE"),
                        ((f'{{ endpoint = "tcp://h:1", public_key = "{a.decode()}", '
                          'certificate = "x.key" }'), "one of"),
                        ('{ endpoint = "tcp://h:1", key = "x" }', "not key"),
                        ('{ endpoint = "tcp://h:1", certificate = "missing.key" }',
                         "no such certificate")):
        roster.write_text(f'[agents]\n"3" = {bad}\n')
        with pytest.raises(RosterError, match=reason) as e:
            read_roster_agents(str(roster))
        assert "\n" not in str(e.value)


def test_a_roster_can_name_the_basestations_keys(tmp_path, ids):
    """`testbed up --secure` writes one roster that is all `basestation` needs: [basestation]
    keys (relative to the roster, or absolute) stand in for --keys; --keys wins."""
    agent = RosterAgent((3,), "tcp://10.0.0.3:5600", keypair(ids, "agent-a").public)
    roster = tmp_path / "roster.toml"
    roster.write_text(format_roster([agent], keys=os.path.relpath(ids["bs"], tmp_path)))
    assert read_roster_keys(str(roster)) == os.path.normpath(ids["bs"])
    assert read_roster_agents(str(roster)) == [agent]
    keyed = build_roster([], str(roster), None)  # no --keys: the roster's
    assert keyed.keys.keypair.public == keypair(ids, "bs").public
    roster.write_text(format_roster([agent], keys=ids["bs"]))
    assert build_roster([], str(roster), None).keys.keypair.public == keypair(ids, "bs").public
    assert build_roster([], str(roster), None, keys_dir=ids["stranger"]).keys.keypair.public \
        == keypair(ids, "stranger").public
    for bad in ('[basestation]\nkeys = 3\n', '[basestation]\nkeys = "x"\nmore = 1\n'):
        roster.write_text(bad + '[agents]\n"3" = "tcp://127.0.0.1:5600"\n')
        with pytest.raises(RosterError, match=r"\[basestation\] takes keys"):
            build_roster([], str(roster), None)
    roster.write_text(format_roster([agent], keys=str(tmp_path / "missing")))
    with pytest.raises(RosterError, match="no such folder"):
        build_roster([], str(roster), None)


def test_protected_by_default_rules(tmp_path, ids):
    for endpoint in ("tcp://127.0.0.1:5600", "tcp://localhost:1", "tcp://[::1]:1",
                     "ipc:///tmp/x", "inproc://x"):
        assert is_loopback_endpoint(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:5600", "tcp://*:5600", "tcp://10.0.0.3:5600",
                     "tcp://eth0:5600", "tcp://box3:5600"):
        assert not is_loopback_endpoint(endpoint), endpoint
    with pytest.raises(RosterError, match="basestation keygen DIR.*--insecure"):
        build_roster([], None, "tcp://0.0.0.0:5700")
    assert build_roster([], None, "tcp://0.0.0.0:5700", insecure=True).keys is None
    assert build_roster([], None, "tcp://127.0.0.1:5700").listen  # loopback: keyless is fine
    roster = tmp_path / "roster.toml"
    roster.write_text(format_roster([RosterAgent((3,), "tcp://10.0.0.3:5600",
                                                 keypair(ids, "agent-a").public)]))
    with pytest.raises(RosterError, match="needs its own keypair"):
        build_roster([], str(roster), None)
    keyed = build_roster([], str(roster), None, keys_dir=ids["bs"])
    assert keyed.public_keys == {"tcp://10.0.0.3:5600": keypair(ids, "agent-a").public}
    with pytest.raises(RosterError, match="no public key.*--insecure"):
        build_roster(["4=tcp://10.0.0.4:5600"], str(roster), None, keys_dir=ids["bs"])
    build_roster(["4=tcp://10.0.0.4:5600"], str(roster), None, keys_dir=ids["bs"],
                 insecure=True)
    build_roster(["4=tcp://127.0.0.1:5600"], str(roster), None, keys_dir=ids["bs"])
    with pytest.raises(RosterError, match="no agent could dial in"):  # bs trusts nobody yet
        build_roster([], None, "tcp://0.0.0.0:5700", keys_dir=ids["bs"])


# -- real agents --------------------------------------------------------------------------------

@pytest.mark.integration
def test_bind_beyond_loopback_without_keys_refuses_with_one_line(tiny_split, run_cli,
                                                                 start_agent):
    for tool, args in (("edge_agent", ("--expert", "0", "--shards", tiny_split, "--bind",
                                       "tcp://0.0.0.0:*")),
                       ("edge_agent", ("--expert", "0", "--shards", tiny_split)),  # default
                       ("basestation", ("status", "--listen", "tcp://0.0.0.0:*"))):
        done = run_cli(tool, *args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "keygen DIR" in lines[0] and "--insecure" in lines[0], lines
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://0.0.0.0:*",
                        "--insecure", "--no-self-benchmark")
    assert agent.alive()
    done = run_cli("basestation", "status", "--listen", "tcp://0.0.0.0:*", "--insecure",
                   "--wait-s", "0.2")
    assert done.returncode == 1 and "error" not in done.stderr, done.stderr  # ran: no agents


@pytest.mark.integration
def test_keyed_agents_serve_a_trusted_basestation_end_to_end(keyed_agents, ids, tiny_split,
                                                             tiny_checkpoint, tmp_path,
                                                             run_cli):
    from test_basestation import reference_tokens

    roster = tmp_path / "roster.toml"
    cert_b = os.path.relpath(public_cert(ids["agent-b"]), tmp_path)
    roster.write_text(
        '[agents]\n'
        f'"0-3" = {{ endpoint = "{keyed_agents["agent-a"].endpoint}", public_key = '
        f'"{keypair(ids, "agent-a").public.decode()}" }}\n'
        f'"4-7" = {{ endpoint = "{keyed_agents["agent-b"].endpoint}", certificate = '
        f'"{cert_b}" }}\n')
    done = run_cli("basestation", "generate", "--shards", tiny_split, "--agents", str(roster),
                   "--keys", ids["bs"], "--prompt", PROMPT, "--max-new-tokens", "8",
                   "--ignore-eos", "--json", "--dtype", "float32", "--wait-s", "20")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["token_ids"] == reference_tokens(tiny_checkpoint, PROMPT, 8)
    assert out["experts_dropped"] == 0 and all(a["failures"] == 0 for a in out["agents"])
    # without the base station's keys the roster's keys are refused before anything is sent
    done = run_cli("basestation", "generate", "--shards", tiny_split, "--agents", str(roster),
                   "--prompt", PROMPT, "--max-new-tokens", "1")
    assert done.returncode == 2 and "needs its own keypair" in done.stderr


@pytest.mark.integration
def test_one_socket_dials_agents_with_different_keys_and_a_plain_one(keyed_agents, ids,
                                                                     start_agent, tiny_split):
    """ZeroMQ takes security options per connect: one ROUTER, three different links."""
    plain = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark")
    reference = load_experts(tiny_split, [0, 5], device="cpu")
    x = torch.randn(3, 64)
    with AgentClient(keypair=keypair(ids, "bs")) as client:
        a = client.connect(keyed_agents["agent-a"].endpoint,
                           server_key=keypair(ids, "agent-a").public)
        b = client.connect(keyed_agents["agent-b"].endpoint,
                           server_key=keypair(ids, "agent-b").public)
        c = client.connect(plain.endpoint)
        def handshakes_done() -> bool:
            try:
                for peer in (a, b, c):
                    client.info(peer, timeout_s=2)
                return True
            except PeerUnreachable:
                return False

        wait_until(handshakes_done, 60, interval_s=0.05, what="all three handshakes")
        sent = {client.send_expert(a, 1, x, [(0, 3)]): 0, client.send_expert(b, 1, x, [(5, 3)]): 5,
                client.send_expert(c, 1, x, [(0, 3)]): 0}
        replies = client.wait(set(sent), timeout_s=10)
        assert set(replies) == set(sent)
        for request_id, expert in sent.items():
            assert_close_rel(replies[request_id].check().tensor(),
                             expert_forward(x, reference.weights[expert][1]))


@pytest.mark.integration
def test_agent_gives_no_answer_to_unkeyed_or_untrusted_clients(keyed_agents, ids):
    agent = keyed_agents["agent-a"]
    agent_key = keypair(ids, "agent-a").public
    with AgentClient() as unkeyed:
        assert_silent(unkeyed, unkeyed.connect(agent.endpoint))
    with AgentClient(keypair=keypair(ids, "stranger")) as stranger:
        assert_silent(stranger, stranger.connect(agent.endpoint, server_key=agent_key))
    with AgentClient(keypair=keypair(ids, "bs")) as wrong_server:  # not agent-a's key
        assert_silent(wrong_server, wrong_server.connect(
            agent.endpoint, server_key=keypair(ids, "agent-b").public))
    with AgentClient(keypair=keypair(ids, "bs")) as trusted:  # the agent still serves others
        assert trusted.info(trusted.connect(agent.endpoint, server_key=agent_key),
                            timeout_s=10)["experts"] == [0, 1, 2, 3]
    assert agent.alive()
    assert "refused a peer" in agent.stderr()  # the stranger's key, logged on the agent


@pytest.mark.integration
def test_listening_basestation_admits_trusted_dial_in_agents_only(start_agent, tiny_split,
                                                                  tmp_path, ids):
    bs = str(tmp_path / "bs")
    keygen(bs, "bs")
    good, bad = make_identity(tmp_path, "edge-good", True), make_identity(tmp_path, "edge-bad",
                                                                          True)
    trust(bs, public_cert(good))
    roster = build_roster([], None, "tcp://127.0.0.1:*", keys_dir=bs)
    with open_links(roster) as client:
        endpoint = client.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        agents = [start_agent("--expert", experts, "--shards", tiny_split, "--basestation",
                              endpoint, "--keys", folder, "--basestation-key", public_cert(bs),
                              "--id", os.path.basename(folder), "--no-self-benchmark")
                  for folder, experts in ((good, "1"), (bad, "2"))]
        assert client.wait_hello(HELLO_TIMEOUT_S) == b"edge-good"
        x = torch.randn(2, 64)
        out, _ = client.expert(b"edge-good", 0, x, [(1, 2)], timeout_s=10)
        reference = load_experts(tiny_split, [1], device="cpu")
        assert_close_rel(out, expert_forward(x, reference.weights[1][0]))
        assert client.wait_hello(SILENCE_S, peer=b"edge-bad") is None
        assert set(client.hellos) == {b"edge-good"}
        with pytest.raises(PeerUnreachable):
            client.send(b"edge-bad", P.PING)
    assert "refused this agent's key" in agents[1].stderr()  # told on the refused box


@pytest.mark.integration
def test_push_needs_a_key_allowed_to_push(start_agent, tiny_split, tmp_path, ids, run_cli):
    agent_dir = make_identity(tmp_path, "edge-store", agent=True)
    trust(agent_dir, public_cert(ids["bs"]))  # may compute, not push
    trust(agent_dir, public_cert(ids["pusher"]), PUSHERS_DIR)  # may push, not compute
    agent = start_agent("--expert", "3", "--store", str(tmp_path / "store"), "--bind",
                        "tcp://127.0.0.1:*", "--keys", agent_dir, "--no-self-benchmark",
                        ready="edge_agent waiting")
    agent_key = load_keypair(agent_dir).public
    with pytest.raises(ShardError, match="may not push"):
        push(tiny_split, 3, agent.endpoint, keypair=keypair(ids, "bs"), agent_key=agent_key)
    done = run_cli("shard_tool", "push", tiny_split, "--expert", "3", "--to", agent.endpoint,
                   "--keys", ids["pusher"], "--agent-key", public_cert(agent_dir))
    assert done.returncode == 0 and "serving" in done.stdout, done.stderr
    agent.wait_line("edge_agent ready", timeout_s=30)
    x = torch.randn(2, 64)
    with AgentClient(keypair=keypair(ids, "bs")) as client:
        out, _ = client.expert(client.connect(agent.endpoint, server_key=agent_key), 1, x,
                               [(3, 2)], timeout_s=10)
    assert_close_rel(out, expert_forward(x, load_experts(tiny_split, [3], device="cpu").weights[3][1]))
    with AgentClient(keypair=keypair(ids, "pusher")) as client:
        peer = client.connect(agent.endpoint, server_key=agent_key)
        with pytest.raises(AgentError, match=P.ERR_NOT_ALLOWED):
            client.expert(peer, 1, x, [(3, 2)], timeout_s=10)
    # the push CLI without keys gets no answer, in one line
    done = run_cli("shard_tool", "push", tiny_split, "--expert", "3", "--to", agent.endpoint,
                   "--timeout-s", "1")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
