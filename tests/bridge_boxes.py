""""Boxes" the way a real network looks, for the tests of experiments on real boxes (issue 22).

One Linux bridge on the host (the base station's interface towards the boxes, what
`--shape-dev` names) and one network namespace per box plugged into it by a veth pair, each
running an `edge_agent` that the test starts itself (not `testbed up`), keyed with CurveZMQ and
trusting the base station's key only. The base station runs on the host and dials the boxes'
bridge addresses through the roster this writes. Root only (namespaces, a bridge).

    with BridgeBoxes(split, num_agents=2, workdir=tmp_path) as boxes:
        boxes.roster       # roster file with every agent's public key and the base station's keys
        boxes.dev          # the bridge
        boxes.addresses    # [box 0's address, box 1's, …]
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

from agent_fixtures import REPO_ROOT, _die_with_parent
from waiting import wait_until

AGENT_PORT = 5600
START_TIMEOUT_S = 90.0  # N agents importing torch on a busy 2-core machine
SUBNET_PREFIX = "10.219"  # 10.219.N.0/24, N picked free (concurrent runs get their own)
SUBNET_TRIES = 20


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def _free_subnet() -> str:
    used = _ip("-o", "-4", "addr", "show").stdout
    for n in random.sample(range(1, 255), 254):
        prefix = f"{SUBNET_PREFIX}.{n}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24")


def split_experts(num_experts: int, num_agents: int) -> list[tuple[int, ...]]:
    per = -(-num_experts // num_agents)
    return [tuple(range(i * per, min(num_experts, (i + 1) * per))) for i in range(num_agents)]


class BridgeBoxes:
    def __init__(self, split: str, num_agents: int, workdir: str, keyed: bool = True,
                 agent_args: tuple[str, ...] = ("--no-self-benchmark",)):
        from shard_tool.manifest import load_manifest

        self.split, self.workdir, self.keyed = split, str(workdir), keyed
        self.agent_args = agent_args
        self.tag = os.urandom(3).hex()
        self.dev = f"wdbr{self.tag}"
        self.experts = split_experts(load_manifest(split).num_experts, num_agents)
        self._use_subnet(_free_subnet())
        self.namespaces = [f"wdbox{self.tag}{i}" for i in range(num_agents)]
        self.procs: list[subprocess.Popen] = []
        self.roster = os.path.join(self.workdir, "roster.toml")
        self.basestation_keys: str | None = None

    # -- bring up / take down ---------------------------------------------------------------

    def __enter__(self) -> BridgeBoxes:
        try:
            self._network()
            agent_keys = self._keys() if self.keyed else [None] * len(self.addresses)
            for i, keys in enumerate(agent_keys):
                self._start_agent(i, keys)
            self._write_roster()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _use_subnet(self, prefix: str) -> None:
        self.prefix = prefix
        self.host_address = f"{prefix}.1"
        self.addresses = [f"{prefix}.{i + 2}" for i in range(len(self.experts))]
        self.endpoints = [f"tcp://{a}:{AGENT_PORT}" for a in self.addresses]

    def _claim_subnet(self) -> None:
        """Our /24 on the bridge, and only ours: a run beside this one (another clone's suite)
        may have picked the same free one at the same moment; then both pick again."""
        for _ in range(SUBNET_TRIES):
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.dev)
            holders = [line.split()[1] for line in _ip("-o", "-4", "addr", "show").stdout
                       .splitlines() if f" {self.prefix}." in line]
            if holders == [self.dev]:
                return
            _ip("addr", "del", f"{self.host_address}/24", "dev", self.dev)
            self._use_subnet(_free_subnet())
        raise RuntimeError(f"no {SUBNET_PREFIX}.N.0/24 of our own in {SUBNET_TRIES} tries")

    def _network(self) -> None:
        _ip("link", "add", self.dev, "type", "bridge")
        self._claim_subnet()
        _ip("link", "set", self.dev, "up")
        for i, ns in enumerate(self.namespaces):
            port = f"wdbp{self.tag}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", port, "master", self.dev)
            _ip("link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _keys(self) -> list[str]:
        from wire.keys import SECRET_SUFFIX, keygen, trust

        root = os.path.join(self.workdir, "keys")
        self.basestation_keys = os.path.join(root, "basestation")
        keygen(self.basestation_keys, "basestation")
        bs_secret = os.path.join(self.basestation_keys, "basestation" + SECRET_SUFFIX)
        folders = []
        for i in range(len(self.addresses)):
            folder = os.path.join(root, f"box-{i}")
            keygen(folder, f"box-{i}")
            trust(folder, bs_secret)
            folders.append(folder)
        return folders

    def _start_agent(self, i: int, keys: str | None) -> None:
        from common.expert_ids import format_expert_ids

        log = open(os.path.join(self.workdir, f"box-{i}.log"), "w")
        cmd = ["ip", "netns", "exec", self.namespaces[i], sys.executable, "-m", "edge_agent",
               "--expert", format_expert_ids(self.experts[i]), "--shards", self.split,
               "--bind", f"tcp://{self.addresses[i]}:{AGENT_PORT}",
               *(["--keys", keys] if keys else ["--insecure"]), *self.agent_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log,
                                           stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=_die_with_parent))
        log.close()

    def public_keys(self) -> list[bytes | None]:
        from wire.keys import load_keypair

        if not self.keyed:
            return [None] * len(self.addresses)
        return [load_keypair(os.path.join(self.workdir, "keys", f"box-{i}")).public
                for i in range(len(self.addresses))]

    def _write_roster(self) -> None:
        from basestation.roster import RosterAgent, format_roster

        agents = [RosterAgent(experts, endpoint, key) for experts, endpoint, key
                  in zip(self.experts, self.endpoints, self.public_keys())]
        with open(self.roster, "w") as f:
            f.write(format_roster(agents, "boxes on a bridge (tests/bridge_boxes.py)",
                                  keys=self.basestation_keys))

    def answering(self) -> set[str]:
        """The endpoints that answer INFO from the host, through the roster's keys."""
        from basestation.roster import build_roster
        from wire.client import AgentClient
        from wire.info import ask_info

        roster = build_roster([], self.roster, None)
        with AgentClient(keypair=roster.keys.keypair if roster.keys else None) as client:
            peers = {client.connect(e, server_key=roster.public_keys.get(e)): e
                     for e in self.endpoints}
            infos = ask_info(client, peers, 2.0).infos
        return {peers[p] for p in infos}

    def _wait_ready(self) -> None:
        def ready() -> bool:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"box {i}'s agent exited ({proc.returncode}): "
                                       f"{self.log(i)[-2000:]}")
            return self.answering() == set(self.endpoints)

        wait_until(ready, START_TIMEOUT_S, interval_s=0.5, what="every box's agent to answer")

    def log(self, i: int) -> str:
        with open(os.path.join(self.workdir, f"box-{i}.log")) as f:
            return f.read()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.dev, check=False)
