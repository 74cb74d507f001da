"""Shape the links to real boxes (the user's agents) from the base station's interface DEV.

`shape_boxes` checks everything first (DEV, the roster, that every agent answers, what DEV
has now), then saves what DEV has into a state file and records each step there *before*
making it, so `unshape` restores DEV exactly, also after a crash or a `kill -9`. The plans are
data (tc_plan.py); here they are run. Nothing on the boxes is touched. This module owns the
order of it all: the checks, shape, degrade, unshape and the ShapedBoxes handle; the state
file is state.py's, the relays and the roster they rewrite are relays.py's.

Backends (tc_plan.choose_backend): netem (root, kernel with netem) shapes everything in tc;
htb+nft+relay (root, no netem) rates in htb, loss and down in an nftables table of ours, delay
and jitter in one relay per box on 127.0.0.1 (testbed/links/relay.py) that a rewritten roster
dials — the relay's own TCP to the box crosses DEV, so the rate and loss apply to it; relays
(no root) does delay, jitter, rate and down in the relays alone and leaves DEV untouched (DEV
then only names the state). State: STATE_DIR/<DEV>.json, relay files in STATE_DIR/<DEV>/.
A shared cell (`cell_mbit`, tc_plan's layout) needs tc: one relay per box cannot share a medium.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import time
from dataclasses import dataclass

from testbed.boxes import tc_plan
from testbed.boxes.relays import (
    relay_settings,
    set_relay,
    start_relays,
    stop_relays,
    write_relayed_roster,
)
from testbed.boxes.state import (
    STATE_ENV,
    default_state_dir,
    load_state,
    record_step,
    remove_state,
    save_state,
    state_file,
    work_dir,
)
from testbed.boxes.tc_plan import FALLBACK, NETEM, RELAYS, SHAPE_BACKENDS, Box
from testbed.links import shaping
from testbed.links.procs import alive, cmdline
from testbed.links.spec import LinkShape, TestbedError

__all__ = ["SHAPE_BACKENDS", "STATE_ENV", "ShapedBoxes", "check_scenario_fits",
           "default_state_dir", "degrade", "kernel_has_netem", "load_shaped", "shape_boxes",
           "unshape"]

ANSWER_TIMEOUT_S = 10.0  # every roster agent must answer INFO within this before we shape
KILL_WAIT_S = 5.0  # a killed shape process is gone within this
_DEV_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # IFNAMSIZ - 1, and safe in a file name
SHAPE_MARK = b"\0shape\0"  # in the command line of `python -m testbed shape`


def _run(cmd: list[str], check: bool = True, input_text: str | None = None):
    try:
        return shaping.run(cmd, check=check, input_text=input_text)
    except shaping.ShapingError as e:
        raise TestbedError(str(e)) from None


def check_scenario_fits(scenario, num_agents: int) -> None:
    """Raises TestbedError when SCENARIO shapes a link the roster does not have."""
    named = sorted(set(scenario.links) | set(scenario.schedules))
    beyond = [i for i in named if not 0 <= i < num_agents]
    if beyond:
        raise TestbedError(f"scenario {scenario.name!r} shapes link {beyond[0]}, but the roster "
                           f"has {num_agents} agent(s) (links 0-{num_agents - 1})")


# -- the checks before anything is touched ----------------------------------------------------

def _check_dev_name(dev: str) -> None:
    if not _DEV_NAME.fullmatch(dev):
        raise TestbedError(f"{dev!r}: not an interface name")


def _require_dev(dev: str) -> None:
    if not os.path.exists(f"/sys/class/net/{dev}"):
        raise TestbedError(f"no interface {dev} on this machine (see `ip link`)")


def _read_roster(roster_path: str):
    from basestation.roster import RosterError, read_roster_agents, read_roster_keys

    try:
        return read_roster_agents(roster_path), read_roster_keys(roster_path)
    except RosterError as e:
        raise TestbedError(str(e)) from None


def _host_port(endpoint: str) -> tuple[str, int]:
    """tcp://HOST:PORT -> (IPv4 address, port). Raises TestbedError."""
    match = re.fullmatch(r"tcp://([^:\[\]]+):(\d+)", endpoint)
    if not match:
        raise TestbedError(f"{endpoint}: links are shaped per IPv4 address; expected "
                           "tcp://HOST:PORT")
    try:
        address = socket.getaddrinfo(match.group(1), None, socket.AF_INET)[0][4][0]
    except OSError:
        raise TestbedError(f"{endpoint}: cannot resolve {match.group(1)}") from None
    return address, int(match.group(2))


def _silent(roster_path: str, timeout_s: float) -> list[str]:
    """The roster's endpoints that do not answer INFO through its keys within timeout_s."""
    from basestation.roster import RosterError, build_roster
    from wire.client import AgentClient
    from wire.info import ask_info

    try:
        roster = build_roster([], roster_path, None)
    except RosterError as e:
        raise TestbedError(str(e)) from None
    with AgentClient(keypair=roster.keys.keypair if roster.keys else None) as client:
        peers = {client.connect(e, server_key=roster.public_keys.get(e)): e
                 for e in roster.endpoints}
        answers = ask_info(client, peers, timeout_s)
    return [peers[p] for p in answers.silent]


def kernel_has_netem() -> bool:
    """Whether the kernel takes a netem qdisc: loaded already, else tried on a device of ours
    made for the probe and removed (never on the user's interface)."""
    if os.path.exists("/sys/module/sch_netem"):
        return True
    probe = f"wdprb{os.getpid() % 0xffffff:06x}"
    if _run(["ip", "link", "add", probe, "type", "ifb"], check=False).returncode:
        return False
    try:
        return shaping.has_netem(probe)
    finally:
        _run(["ip", "link", "del", probe], check=False)


def _show(dev: str) -> str:
    return _run(["tc", "qdisc", "show", "dev", dev]).stdout


# -- the handle callers keep -------------------------------------------------------------------

@dataclass
class ShapedBoxes:
    dev: str
    state_dir: str
    backend: str  # the one chosen
    roster_path: str  # what the base station must dial (rewritten when relays are used)
    endpoints: list[str]  # roster order: each box's own endpoint
    shapes: dict[int, LinkShape]  # what is asked now, per link index
    cell_mbit: float | None = None  # each direction's shared cell, None: every link its own

    def degrade(self, index: int, shape: LinkShape) -> None:
        """Change link INDEX to SHAPE now (only what differs). Raises TestbedError."""
        degrade(self.dev, index, shape, self.state_dir)
        self.shapes[index] = shape

    def down(self) -> list[str]:
        """= unshape; returns what it removed."""
        return unshape(self.dev, self.state_dir)


def _handle(state: dict, state_dir: str) -> ShapedBoxes:
    return ShapedBoxes(state["dev"], state_dir, state["backend"], state["roster_path"],
                       [b["endpoint"] for b in state["boxes"]],
                       {b["index"]: LinkShape(**b["shape"]) for b in state["boxes"]},
                       state.get("cell_mbit"))


def load_shaped(dev: str, state_dir: str | None = None) -> ShapedBoxes:
    """The boxes shaped on DEV (by any process). Raises TestbedError when nothing is."""
    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir, dev)
    if state is None:
        raise TestbedError(f"nothing is shaped on {dev} (state in {state_dir}); run "
                           f"`testbed shape --dev {dev} ...` first")
    return _handle(state, state_dir)


# -- shape --------------------------------------------------------------------------------------

def shape_boxes(roster_path: str, dev: str, shapes: dict[int, LinkShape], *,
                backend: str = "auto", force: bool = False, state_dir: str | None = None,
                check_answers: bool = True, answer_timeout_s: float = ANSWER_TIMEOUT_S,
                cell_mbit: float | None = None) -> ShapedBoxes:
    """Shape the link to each box ROSTER_PATH names (numbered in its order) to SHAPES (link
    index -> shape; the others unshaped), both directions, on DEV; with CELL_MBIT every
    direction's boxes share a cell of that total (tc_plan). Checks first, touching nothing:
    DEV, the roster, every agent answering INFO (`check_answers`), DEV's qdiscs being the
    kernel's defaults (else refused unless `force`), no shaping already there. Raises
    TestbedError (after undoing whatever it did)."""
    state_dir = state_dir or default_state_dir()
    _check_dev_name(dev)
    tc_plan.check_cell(cell_mbit)
    agents, keys = _read_roster(roster_path)
    num_links = len(agents)
    for index, shape in shapes.items():
        if not 0 <= index < num_links:
            raise TestbedError(f"link {index}: the roster has {num_links} agent(s) "
                               f"(links 0-{num_links - 1})")
        shape.check()
    if load_state(state_dir, dev) is not None:  # before DEV's qdiscs: ours would look foreign
        raise TestbedError(f"{dev} is shaped already (state {state_file(state_dir, dev)}); "
                           f"run `testbed unshape --dev {dev}` first")
    root = os.geteuid() == 0
    probe = root and backend in ("auto", NETEM)
    chosen = tc_plan.choose_backend(root, probe and kernel_has_netem(), backend)
    if chosen == RELAYS and cell_mbit is not None:
        raise TestbedError(f"a shared cell (--cell-mbit) needs tc: the {RELAYS} backend has one "
                           "relay per box, which cannot share one medium (shape as root)")
    targets = [_host_port(a.endpoint) for a in agents]
    boxes = [Box(i, address) for i, (address, _) in enumerate(targets)]
    saved_show = ""
    if chosen == RELAYS:
        lossy = sorted(i for i, s in shapes.items() if s.loss_pct)
        if lossy:
            raise TestbedError(f"link {lossy[0]}: loss needs root (the relays backend has no "
                               "packets to drop: it sees TCP bytes, which arrive whole)")
    else:
        _require_dev(dev)
        shared = {b.address for b in boxes if [c.address for c in boxes].count(b.address) > 1}
        if shared:
            raise TestbedError(f"two roster agents are at {sorted(shared)[0]}: links are shaped "
                               "per address (use the relays backend)")
        saved_show = _show(dev)
        foreign = tc_plan.foreign_qdiscs(saved_show)
        if foreign and not force:
            raise TestbedError(f"{dev} already has a {foreign[0]} (someone's shaping); "
                               "--force replaces it (restored best effort by unshape)")
    if chosen == FALLBACK:
        try:
            shaping.ensure_nft()
        except shaping.ShapingError as e:
            raise TestbedError(str(e)) from None
    if check_answers:
        silent = _silent(roster_path, answer_timeout_s)
        if silent:
            raise TestbedError(f"{silent[0]} did not answer INFO within {answer_timeout_s:g} s "
                               "(is its agent running, and the roster's key right?)")
    os.makedirs(work_dir(state_dir, dev), exist_ok=True)
    ifb = tc_plan.ifb_name(dev)
    state = {
        "dev": dev, "backend": chosen, "pid": os.getpid(), "forced": force,
        "cell_mbit": cell_mbit,
        "roster_source": os.path.abspath(roster_path), "roster_path": os.path.abspath(roster_path),
        "saved": {"qdisc_show": saved_show,
                  "ifb_existed": os.path.exists(f"/sys/class/net/{ifb}"),
                  "nft_tables": _nft_tables() if chosen == FALLBACK else ""},
        "made": {},
        "boxes": [{"index": b.index, "endpoint": a.endpoint, "address": b.address,
                   "port": port, "shape": dataclasses.asdict(shapes.get(b.index, LinkShape())),
                   "relay": None} for b, a, (_, port) in zip(boxes, agents, targets)],
    }
    save_state(state_dir, state)  # first: unshape finds whatever follows
    try:
        _make(state, state_dir, boxes, agents, keys)
    except BaseException:
        unshape(dev, state_dir)
        raise
    return _handle(state, state_dir)


def _nft_tables() -> str:
    return _run(["nft", "list", "tables"], check=False).stdout


def _make(state: dict, state_dir: str, boxes: list[Box], agents, keys: str | None) -> None:
    dev, backend, cell_mbit = state["dev"], state["backend"], state.get("cell_mbit")
    shapes = {b["index"]: LinkShape(**b["shape"]) for b in state["boxes"]}
    if backend in (NETEM, FALLBACK):
        ifb = tc_plan.ifb_name(dev)
        record_step(state, state_dir, "root", True)
        for cmd in tc_plan.tree_plan(dev, "down", boxes, shapes, backend, cell_mbit):
            _run(cmd)
        if not state["saved"]["ifb_existed"]:
            record_step(state, state_dir, "ifb", ifb)
        record_step(state, state_dir, "ifb_root", ifb)
        record_step(state, state_dir, "ingress", True)
        if state["forced"] and tc_plan.ingress_qdisc(state["saved"]["qdisc_show"]):
            _run(["tc", "qdisc", "del", "dev", dev, "ingress"], check=False)
            _run(["tc", "qdisc", "del", "dev", dev, "clsact"], check=False)
        add_ifb, set_ifb_up, add_ingress, redirect = tc_plan.ifb_plan(dev)
        if not state["saved"]["ifb_existed"]:
            _run(add_ifb)
        _run(set_ifb_up)
        # The IFB's tree before the redirect: nothing DEV receives passes unshaped meanwhile.
        for cmd in tc_plan.tree_plan(ifb, "up", boxes, shapes, backend, cell_mbit):
            _run(cmd)
        _run(add_ingress)
        _run(redirect)
    if backend == FALLBACK and tc_plan.nft_needed(shapes):
        _apply_nft(state, state_dir, boxes, shapes)
    if backend in (FALLBACK, RELAYS):
        start_relays(state, state_dir)
        write_relayed_roster(state, state_dir, agents, keys)
    save_state(state_dir, state)


def _apply_nft(state: dict, state_dir: str, boxes: list[Box],
               shapes: dict[int, LinkShape]) -> None:
    """Replace our nft table with SHAPES' loss and down (netdev, else inet: recorded first)."""
    families = [state["made"]["nft"]] if state["made"].get("nft") else tc_plan.NFT_FAMILIES
    for i, family in enumerate(families):
        record_step(state, state_dir, "nft", family)
        try:
            _run(["nft", "-f", "-"], input_text=tc_plan.nft_script(state["dev"], boxes, shapes,
                                                                   family))
            return
        except TestbedError:
            if i == len(families) - 1:
                raise


# -- degrade ------------------------------------------------------------------------------------

def degrade(dev: str, index: int, shape: LinkShape, state_dir: str | None = None) -> None:
    """Change the shape of link INDEX on DEV while everything runs, only what differs.
    Raises TestbedError."""
    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir, dev)
    if state is None:
        raise TestbedError(f"nothing is shaped on {dev}; run `testbed shape --dev {dev}` first")
    boxes = state["boxes"]
    if not 0 <= index < len(boxes):
        raise TestbedError(f"no link {index} (links 0-{len(boxes) - 1})")
    shape.check()
    backend, box = state["backend"], boxes[index]
    if backend == RELAYS and shape.loss_pct:
        raise TestbedError("loss needs root (the relays backend has no packets to drop: it "
                           "sees TCP bytes, which arrive whole)")
    old = LinkShape(**box["shape"])
    if backend in (NETEM, FALLBACK):
        for cmd in tc_plan.change_plan(dev, Box(index, box["address"]), old, shape, backend,
                                       state.get("cell_mbit"), len(boxes)):
            _run(cmd)
    if backend == FALLBACK and (old.loss_pct, old.down) != (shape.loss_pct, shape.down):
        shapes = {b["index"]: LinkShape(**b["shape"]) for b in boxes} | {index: shape}
        _apply_nft(state, state_dir, [Box(b["index"], b["address"]) for b in boxes], shapes)
    if box.get("relay") and relay_settings(backend, old) != relay_settings(backend, shape):
        set_relay(state, box, shape)
    box["shape"] = dataclasses.asdict(shape)
    save_state(state_dir, state)


# -- unshape ------------------------------------------------------------------------------------

def _is_shape_process(pid: int, dev: str) -> bool:
    """`python -m testbed shape ... --dev DEV` (not a recycled pid, not a harness process)."""
    line = cmdline(pid)
    return SHAPE_MARK in line and b"testbed" in line and f"\0{dev}\0".encode() in line + b"\0"


def _kill_shape_process(pid: int | None, dev: str) -> bool:
    if not pid or pid == os.getpid() or not _is_shape_process(pid, dev):
        return False
    try:
        os.kill(pid, signal.SIGKILL)  # it would undo what we undo here: no race, no grace
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + KILL_WAIT_S
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return True


def _ours_now(dev: str, made: dict) -> dict:
    """MADE narrowed to what is still ours on DEV now (a root qdisc someone replaced since is
    theirs)."""
    show = _run(["tc", "qdisc", "show", "dev", dev], check=False).stdout
    root, ingress = tc_plan.root_qdisc(show), tc_plan.ingress_qdisc(show)
    return {**made,
            "root": bool(made.get("root") and root and (root.kind, root.handle) == ("htb", "1:")),
            "ingress": bool(made.get("ingress") and ingress and ingress.kind == "ingress")}


def unshape(dev: str, state_dir: str | None = None) -> list[str]:
    """Undo `shape_boxes` on DEV: kill the shape process and relays recorded (when ours),
    delete our qdiscs, IFB and nft table, put back a root qdisc --force replaced, remove the
    state. Safe to run twice, and after a `kill -9` of shape. Returns what it removed."""
    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir, dev)
    if state is None:
        return []
    removed = []
    if _kill_shape_process(state.get("pid"), dev):
        removed.append(f"shape process {state['pid']}")
    relays = stop_relays(state)
    removed += [f"relay {pid}" for pid in relays]
    made = state.get("made", {})
    if made:
        if made.get("root") or made.get("ingress"):
            made = _ours_now(dev, made)
        named = {"root": f"root qdisc on {dev}", "ingress": f"ingress qdisc on {dev}",
                 "ifb": f"IFB {made.get('ifb')}",
                 "ifb_root": f"root qdisc on {made.get('ifb_root')}",
                 "nft": f"nft table {made.get('nft')} {tc_plan.nft_table(dev)}"}
        for key, cmd in tc_plan.teardown_plan(dev, made):
            if _run(cmd, check=False).returncode == 0:
                removed.append(named[key])
        for what, tries in tc_plan.restore_plan(dev, state["saved"]["qdisc_show"],
                                                state.get("forced", False)):
            if any(_run(cmd, check=False).returncode == 0 for cmd in tries):
                removed.append(f"(restored {what} on {dev})")
            else:
                removed.append(f"(could not restore {what} on {dev}: it was "
                               f"{state['saved']['qdisc_show'].strip()!r}; put it back by hand)")
    remove_state(state_dir, dev)
    return removed
