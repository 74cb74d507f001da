"""`--agent EXPERTS=ENDPOINT@KEY`: a keyed agent reached from the command line alone, its key
given as a certificate file or as the key text (basestation/roster.py parse_agent_arg). Before,
only a roster file could carry an agent's public key."""

from __future__ import annotations

import shutil

import pytest
from agent_fixtures import start_module_agent  # noqa: F401

from basestation.roster import RosterAgent, RosterError, build_roster, parse_agent_arg
from wire.keys import PUSHERS_DIR, TRUSTED_DIR, keygen, load_keypair, trust


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> key folder: a base station, and an agent that trusts it."""
    root = tmp_path_factory.mktemp("agent-flag-keys")
    folders = {"bs": str(root / "bs"), "agent": str(root / "agent")}
    keygen(folders["bs"], "bs")
    keygen(folders["agent"], "edge-a", (TRUSTED_DIR, PUSHERS_DIR))
    trust(folders["agent"], certificate(folders["bs"]))
    return folders


def certificate(folder: str) -> str:
    """The public certificate (NAME.key) of a key folder: the file one gives to peers."""
    return load_keypair(folder).path.removesuffix("_secret")


# -- parsing (no processes) -----------------------------------------------------------------

def test_the_key_is_a_certificate_file_or_the_key_text(keys, tmp_path):
    public = load_keypair(keys["agent"]).public
    cert = certificate(keys["agent"])
    assert parse_agent_arg(f"0-3=tcp://10.0.0.3:5600@{cert}") == \
        RosterAgent((0, 1, 2, 3), "tcp://10.0.0.3:5600", public)
    assert parse_agent_arg(f"3=tcp://10.0.0.3:5600@{public.decode()}") == \
        RosterAgent((3,), "tcp://10.0.0.3:5600", public)
    # no '@': a plain agent, as before; '@' leading an ipc path is Linux's abstract namespace
    assert parse_agent_arg("3=tcp://10.0.0.3:5600") == RosterAgent((3,), "tcp://10.0.0.3:5600")
    assert parse_agent_arg("3=ipc://@wdmoe") == RosterAgent((3,), "ipc://@wdmoe")
    assert parse_agent_arg(f"3=ipc://@wdmoe@{cert}").endpoint == "ipc://@wdmoe"
    # Z85 has '@' and '/' among its characters: a key with both still reads as a key
    at_key = "/@" + public.decode()[2:]  # a group below 2**32, as a real key
    assert parse_agent_arg(f"3=tcp://h:1@{at_key}").public_key == at_key.encode()
    assert parse_agent_arg(f"3=ipc:///run/a@b.sock@{at_key}") == \
        RosterAgent((3,), "ipc:///run/a@b.sock", at_key.encode())
    # a certificate path may hold '@' itself: a tcp endpoint never does
    (tmp_path / "user@box").mkdir()
    at_cert = shutil.copy(cert, tmp_path / "user@box" / "edge-a.key")
    assert parse_agent_arg(f"3=tcp://h:1@{at_cert}") == RosterAgent((3,), "tcp://h:1", public)


def test_flag_keys_reach_the_roster_and_agree_with_roster_files(keys, tmp_path):
    public = load_keypair(keys["agent"]).public
    roster = build_roster([f"0-3=tcp://10.0.0.3:5600@{certificate(keys['agent'])}"], None,
                          None, keys_dir=keys["bs"])
    assert roster.public_keys == {"tcp://10.0.0.3:5600": public}
    other = tmp_path / "roster.toml"  # the same agent, another key: refused
    other.write_text('[agents]\n"4" = { endpoint = "tcp://10.0.0.3:5600", public_key = '
                     f'"{load_keypair(keys["bs"]).public.decode()}" }}\n')
    with pytest.raises(RosterError, match="two different public keys"):
        build_roster([f"0-3=tcp://10.0.0.3:5600@{public.decode()}"], str(other), None,
                     keys_dir=keys["bs"])
    with pytest.raises(RosterError, match="needs its own keypair"):  # no --keys
        build_roster([f"0-3=tcp://10.0.0.3:5600@{public.decode()}"], None, None)


@pytest.mark.parametrize("after_at, message", [
    ("/no/such/edge.key", "no such certificate file, nor a public key"),
    ("", "no such certificate file, nor a public key"),
    ("x" * 39, "no such certificate file, nor a public key"),
    ("~" * 40, "is not a CURVE public key"),  # 40 characters, not Z85
])
def test_bad_keys_are_one_line_errors(after_at, message):
    with pytest.raises(RosterError, match=message) as caught:
        parse_agent_arg(f"0-3=tcp://10.0.0.3:5600@{after_at}")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--agent ")


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path):
    junk = tmp_path / "notes.key"
    junk.write_text("hello\n")
    with pytest.raises(RosterError, match="not a ZeroMQ certificate"):
        parse_agent_arg(f"0-3=tcp://10.0.0.3:5600@{junk}")


# -- a real keyed agent, reached with --agent only -------------------------------------------

@pytest.mark.integration
def test_status_reaches_a_keyed_agent_named_by_flag_only(start_module_agent, tiny_split, keys,
                                                          run_cli):
    agent = start_module_agent("--expert", "0-3", "--shards", tiny_split, "--bind",
                               "tcp://127.0.0.1:*", "--keys", keys["agent"],
                               "--no-self-benchmark")
    done = run_cli("basestation", "status", "--agent",
                   f"0-3={agent.endpoint}@{certificate(keys['agent'])}", "--keys", keys["bs"],
                   "--wait-s", "20")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(agent.endpoint))
    assert row.split()[1] == "yes" and row.split()[2] == "0,1,2,3"
    # bad inputs on the real command line: one line, exit 2, no traceback
    for flag in (f"0-3={agent.endpoint}@/no/such/edge.key", f"0-3={agent.endpoint}@{'~' * 40}"):
        done = run_cli("basestation", "status", "--agent", flag, "--keys", keys["bs"])
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
