"""What to run to shape real boxes' links on the base station's interface DEV: pure plans.

Every function here returns data (argv lists for `tc`/`ip`, nft script text, a decision) and
runs nothing; shaper.py executes them. Layout on DEV (and on the IFB device for what DEV
receives):

    DEV root  htb 1: (no default class: unclassified traffic is sent directly, untouched)
      class 1:<10+i>  htb rate = box i's rate (a large ceiling when unlimited)
        leaf <10+i>:  netem (delay, jitter, loss, down = 100 % loss)  or  pfifo (fallback)
      filter u32 match ip dst ADDR_i/32 -> 1:<10+i>         (base station -> box: down)
    DEV ingress ffff:  filter u32 match-all -> mirred egress redirect dev IFB
    IFB root  the same tree, filters match ip src ADDR_i/32 with the up rate (box -> base station)

A shared cell of total B (`cell_mbit`) puts one class 1:1 (rate = ceil = B) under the root and
every box's class under it with rate = B/N and ceil = B (or the box's own rate when lower): a
box alone may use all of B, busy boxes share it (HTB lends a parent's idle rate to its busy
children). Each direction has its own cell of B (FDD-like: down and up pools are separate).

Without netem (the "htb+nft+relay" fallback) the leaves are plain FIFOs, loss and down are an
nftables table of ours on DEV (`nft_script`), and delay and jitter are relays.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.links.shaping import netem_args
from testbed.links.spec import LinkShape, TestbedError

NETEM = "netem"
FALLBACK = "htb+nft+relay"
RELAYS = "relays"
AUTO = "auto"
SHAPE_BACKENDS = (AUTO, NETEM, FALLBACK, RELAYS)

ROOT_HANDLE = "1:"
INGRESS_HANDLE = "ffff:"
CLASS_BASE = 10  # box i's class is 1:<10+i> (minor 1 would be easy to confuse with the root)
CELL_CLASS = "1:1"  # the shared cell's class, parent of every box's class (with a cell)
UNLIMITED_MBIT = 10000.0  # an unlimited link's class: a ceiling these links do not reach
# htb's own burst at high rates rounds to 0 bytes, which throttles 64 KiB GSO packets: give
# each class 4 ms of its rate (as testbed/links' tbf), at least 32 KiB, at most 1 MiB.
BURST_S = 0.004
MIN_BURST_BYTES = 32 * 1024
MAX_BURST_BYTES = 1024 * 1024
QUANTUM_BYTES = 64 * 1024  # fixed: rate / r2q is out of htb's range at both ends
# The device's txqueuelen sizes HTB's direct queue and a default leaf (a bridge may have 0,
# which makes both hold 1-2 packets): give every queue its own length.
QUEUE_PACKETS = 10000
IFB_PREFIX = "wdifb"  # + 8 hex of DEV's name: 13 characters, under IFNAMSIZ's 15
NFT_TABLE = "wdmoe_shape"  # + "_" and 8 hex of DEV's name: one table per shaped interface
NFT_FAMILIES = ("netdev", "inet")  # netdev (ingress + egress hooks, kernel >= 5.16), else inet
# Root qdiscs the kernel attaches by itself: replacing one and deleting ours restores it.
DEFAULT_ROOT_QDISCS = ("noqueue", "pfifo_fast", "fq_codel", "mq", "fq", "noop")
LOSS_SCALE = 10000  # nft drops per ten thousand: loss exact to 0.01 %


@dataclass(frozen=True)
class Box:
    """One box's link as the plans need it."""

    index: int  # link number: its place in the roster
    address: str  # IPv4 address the base station reaches it at


def choose_backend(is_root: bool, kernel_has_netem: bool, asked: str) -> str:
    """The backend to shape with. Raises TestbedError (one line) when ASKED cannot run here."""
    if asked not in SHAPE_BACKENDS:
        raise TestbedError(f"backend {asked!r}: expected one of {', '.join(SHAPE_BACKENDS)}")
    if asked == AUTO:
        if not is_root:
            return RELAYS
        return NETEM if kernel_has_netem else FALLBACK
    if asked in (NETEM, FALLBACK) and not is_root:
        raise TestbedError(f"backend {asked} needs root (tc and nftables on the interface); "
                           f"backend {RELAYS} works without")
    if asked == NETEM and not kernel_has_netem:
        raise TestbedError(f"backend {NETEM}: this kernel has no netem (sch_netem); use "
                           f"{FALLBACK} (or auto)")
    return asked


def ifb_name(dev: str) -> str:
    """The IFB device of ours that shapes what DEV receives (a name derived from DEV's)."""
    return IFB_PREFIX + hashlib.sha256(dev.encode()).hexdigest()[:8]


def nft_table(dev: str) -> str:
    """Our nft table for DEV (its own: two shaped interfaces never share rules)."""
    return f"{NFT_TABLE}_{hashlib.sha256(dev.encode()).hexdigest()[:8]}"


def class_id(index: int) -> str:
    # tc reads class minors as hex: "1:10" is 0x10; decimal digits keep them distinct and
    # readable as "box index + 10" in `tc class show`
    return f"1:{CLASS_BASE + index}"


def leaf_handle(index: int) -> str:
    return f"{CLASS_BASE + index}:"


def _burst_bytes(rate_mbit: float) -> str:
    return str(max(MIN_BURST_BYTES, min(MAX_BURST_BYTES, int(rate_mbit * 1e6 / 8 * BURST_S))))


def _kbit(rate_mbit: float) -> str:
    return f"{max(1, round(rate_mbit * 1000))}kbit"


def htb_rate_args(rate_mbit: float | None, ceil_mbit: float | None = None) -> list[str]:
    """rate, ceil, burst and quantum of a class (rate None: unlimited; ceil None: = rate).
    burst follows the rate, cburst the ceiling: each is 4 ms of what it bounds."""
    rate_mbit = rate_mbit or UNLIMITED_MBIT
    ceil_mbit = ceil_mbit or rate_mbit
    return ["rate", _kbit(rate_mbit), "ceil", _kbit(ceil_mbit), "burst", _burst_bytes(rate_mbit),
            "cburst", _burst_bytes(ceil_mbit), "quantum", str(QUANTUM_BYTES)]


def cell_rates(cell_mbit: float, num_boxes: int, own_mbit: float | None) -> tuple[float, float]:
    """(rate, ceil) of a box's class in a cell of CELL_MBIT shared by NUM_BOXES: guaranteed
    B/N, may borrow up to B; a box's own lower rate caps both (htb needs rate <= ceil)."""
    ceil_mbit = min(cell_mbit, own_mbit) if own_mbit else cell_mbit
    return min(cell_mbit / num_boxes, ceil_mbit), ceil_mbit


def check_cell(cell_mbit: float | None) -> None:
    """Raises TestbedError for a cell no htb can make (None: no cell, fine)."""
    if cell_mbit is not None and not 0 < cell_mbit <= UNLIMITED_MBIT:
        raise TestbedError(f"cell {cell_mbit:g} mbit: expected > 0 and at most "
                           f"{UNLIMITED_MBIT:g} mbit")


def direction_rate(shape: LinkShape, way: str) -> float | None:
    """WAY "down" (base station -> box, DEV's egress) or "up" (box -> base station, the IFB)."""
    return shape.down_rate_mbit if way == "down" else shape.up_rate_mbit


def leaf_args(backend: str, shape: LinkShape) -> list[str]:
    """The qdisc under a box's class: netem carrying delay/jitter/loss/down, or a FIFO."""
    if backend == NETEM:
        args = netem_args(shape, None) or ["netem"]
        if "limit" not in args:
            args += ["limit", str(QUEUE_PACKETS)]
        return args
    return ["pfifo", "limit", str(QUEUE_PACKETS)]


def class_cmd(dev: str, index: int, rate_mbit: float | None, verb: str = "add",
              cell_mbit: float | None = None, num_boxes: int = 1) -> list[str]:
    """Box INDEX's class: under the root at its own rate, or in the cell (cell_rates)."""
    if cell_mbit is None:
        parent, rate_args = ROOT_HANDLE, htb_rate_args(rate_mbit)
    else:
        parent, rate_args = CELL_CLASS, htb_rate_args(*cell_rates(cell_mbit, num_boxes,
                                                                  rate_mbit))
    return ["tc", "class", verb, "dev", dev, "parent", parent, "classid", class_id(index),
            "htb", *rate_args]


def cell_class_cmd(dev: str, cell_mbit: float) -> list[str]:
    """The cell's class under the root: all of B, the pool its boxes' classes borrow from."""
    return ["tc", "class", "add", "dev", dev, "parent", ROOT_HANDLE, "classid", CELL_CLASS,
            "htb", *htb_rate_args(cell_mbit)]


def leaf_cmd(dev: str, index: int, backend: str, shape: LinkShape,
             verb: str = "add") -> list[str]:
    return ["tc", "qdisc", verb, "dev", dev, "parent", class_id(index), "handle",
            leaf_handle(index), *leaf_args(backend, shape)]


def tree_plan(dev: str, way: str, boxes: Sequence[Box], shapes: dict[int, LinkShape],
              backend: str, cell_mbit: float | None = None) -> list[list[str]]:
    """The htb tree on DEV for one direction: root, (with CELL_MBIT the cell's class,) then
    per box a class, its leaf and the u32 filter sending its packets there (by destination on
    the way down, source up)."""
    field = "dst" if way == "down" else "src"
    cmds = [["tc", "qdisc", "replace", "dev", dev, "root", "handle", ROOT_HANDLE, "htb",
             "direct_qlen", str(QUEUE_PACKETS)]]
    if cell_mbit is not None:
        cmds.append(cell_class_cmd(dev, cell_mbit))
    for box in boxes:
        shape = shapes.get(box.index, LinkShape())
        cmds.append(class_cmd(dev, box.index, direction_rate(shape, way), cell_mbit=cell_mbit,
                              num_boxes=len(boxes)))
        cmds.append(leaf_cmd(dev, box.index, backend, shape))
        # filters stay on the root: u32 classifies straight into a leaf class at any depth
        cmds.append(["tc", "filter", "add", "dev", dev, "parent", ROOT_HANDLE, "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", field, f"{box.address}/32",
                     "flowid", class_id(box.index)])
    return cmds


def ifb_plan(dev: str) -> list[list[str]]:
    """The IFB device and DEV's ingress qdisc redirecting everything DEV receives to it."""
    ifb = ifb_name(dev)
    return [["ip", "link", "add", ifb, "type", "ifb"],
            ["ip", "link", "set", ifb, "up"],
            ["tc", "qdisc", "add", "dev", dev, "handle", INGRESS_HANDLE, "ingress"],
            ["tc", "filter", "add", "dev", dev, "parent", INGRESS_HANDLE, "protocol", "all",
             "prio", "1", "u32", "match", "u32", "0", "0",
             "action", "mirred", "egress", "redirect", "dev", ifb]]


def change_plan(dev: str, box: Box, old: LinkShape, new: LinkShape, backend: str,
                cell_mbit: float | None = None, num_boxes: int = 1) -> list[list[str]]:
    """The tc commands turning box's link from OLD into NEW, only where they differ (each
    direction's class rate; the netem leaves). In a cell (CELL_MBIT shared by NUM_BOXES) the
    class stays under the cell's class, its ceiling capped by the new rate."""
    cmds = []
    for where, way in ((dev, "down"), (ifb_name(dev), "up")):
        if direction_rate(old, way) != direction_rate(new, way):
            cmds.append(class_cmd(where, box.index, direction_rate(new, way), verb="change",
                                  cell_mbit=cell_mbit, num_boxes=num_boxes))
        if backend == NETEM and leaf_args(backend, old) != leaf_args(backend, new):
            cmds.append(leaf_cmd(where, box.index, backend, new, verb="change"))
    return cmds


def _loss_match(shape: LinkShape) -> str | None:
    """The nft match dropping this shape's share of packets ('' drops all), None: none."""
    per_10k = LOSS_SCALE if shape.down else round(shape.loss_pct * LOSS_SCALE / 100)
    if per_10k >= LOSS_SCALE:
        return ""  # numgen's values stop at LOSS_SCALE - 1: 100 % is "drop all"
    return f"numgen random mod {LOSS_SCALE} < {per_10k} " if per_10k > 0 else None


def nft_script(dev: str, boxes: Sequence[Box], shapes: dict[int, LinkShape],
               family: str = "netdev") -> str:
    """An atomic nft transaction replacing our table with one dropping each box's loss share
    (everything when down), by its address, in both directions on DEV.

    netdev: DEV's ingress (ip saddr) and egress (ip daddr) hooks, silent like netem; inet
    (input/output) for kernels without the egress hook, where a local send that is dropped
    gets EPERM instead of vanishing."""
    if family == "netdev":
        hooks = [("ingress", f'ingress device "{dev}"', "", "saddr"),
                 ("egress", f'egress device "{dev}"', "", "daddr")]
    elif family == "inet":
        hooks = [("input", "input", f'iifname "{dev}" ', "saddr"),
                 ("output", "output", f'oifname "{dev}" ', "daddr")]
    else:
        raise ValueError(f"nft family {family!r}")
    chains = ""
    for name, hook, iface, field in hooks:
        rules = ""
        for box in boxes:
            match = _loss_match(shapes.get(box.index, LinkShape()))
            if match is not None:
                rules += f"    {iface}ip {field} {box.address} {match}drop\n"
        chains += (f"  chain {name} {{\n    type filter hook {hook} priority 0; policy accept;\n"
                   f"{rules}  }}\n")
    # "add table" then "delete table": the delete is safe when the table does not exist yet.
    table = nft_table(dev)
    return (f"add table {family} {table}\ndelete table {family} {table}\n"
            f"table {family} {table} {{\n{chains}}}\n")


def nft_needed(shapes: dict[int, LinkShape]) -> bool:
    return any(_loss_match(s) is not None for s in shapes.values())


# -- what DEV has, and taking ours away -------------------------------------------------------

_QDISC_RE = re.compile(r"^qdisc (\S+) (\S+) (?:dev \S+ )?(root|parent \S+|ingress)\b(.*)$")


@dataclass(frozen=True)
class QdiscLine:
    kind: str
    handle: str
    parent: str  # "root", "parent X:Y" or "ingress"
    rest: str  # what follows (refcnt and the parameters)
    line: str


def parse_qdiscs(show_text: str) -> list[QdiscLine]:
    """`tc qdisc show dev DEV` lines (with or without 'dev DEV') as QdiscLines."""
    out = []
    for line in show_text.splitlines():
        match = _QDISC_RE.match(line.strip())
        if match:
            out.append(QdiscLine(match.group(1), match.group(2), match.group(3),
                                 match.group(4).strip(), line.strip()))
    return out


def root_qdisc(show_text: str) -> QdiscLine | None:
    return next((q for q in parse_qdiscs(show_text) if q.parent == "root"), None)


def ingress_qdisc(show_text: str) -> QdiscLine | None:
    """DEV's ingress or clsact qdisc (both sit at parent ffff:fff1), or None."""
    return next((q for q in parse_qdiscs(show_text) if q.kind in ("ingress", "clsact")), None)


def foreign_qdiscs(show_text: str) -> list[str]:
    """What on DEV is not the kernel's default: a root qdisc of another kind, an ingress or
    clsact qdisc (someone's shaping, which we would replace). Empty: DEV is as booted."""
    out = []
    root = root_qdisc(show_text)
    if root is not None and root.kind not in DEFAULT_ROOT_QDISCS:
        out.append(f"root qdisc {root.kind} {root.handle}")
    ingress = ingress_qdisc(show_text)
    if ingress is not None:
        out.append(f"{ingress.kind} qdisc")
    return out


def restore_args(saved: QdiscLine) -> list[list[str]]:
    """Ways to put a saved root qdisc back, best first: its kind with the parameters `tc show`
    printed (most qdiscs take them back), then its kind alone."""
    params = re.sub(r"^refcnt \d+\s*", "", saved.rest).split()
    handle = [] if saved.handle == "0:" else ["handle", saved.handle]
    tries = [[*handle, saved.kind, *params]] if params else []
    return tries + [[*handle, saved.kind]]


def teardown_plan(dev: str, made: dict) -> list[tuple[str, list[str]]]:
    """(what, command) pairs removing what shaping made on DEV (MADE: the state's record of
    it); each may fail when that part is gone already (shaper runs them unchecked)."""
    cmds = []
    if made.get("root"):
        cmds.append(("root", ["tc", "qdisc", "del", "dev", dev, "root"]))
    if made.get("ingress"):
        cmds.append(("ingress", ["tc", "qdisc", "del", "dev", dev, "ingress"]))
    if made.get("ifb"):
        cmds.append(("ifb", ["ip", "link", "del", made["ifb"]]))
    elif made.get("ifb_root"):  # an IFB that was there before: only our tree on it goes
        cmds.append(("ifb_root", ["tc", "qdisc", "del", "dev", made["ifb_root"], "root"]))
    if made.get("nft"):
        cmds.append(("nft", ["nft", "delete", "table", made["nft"], nft_table(dev)]))
    return cmds


def restore_plan(dev: str, saved_show: str, forced: bool) -> list[tuple[str, list[list[str]]]]:
    """After teardown, what --force replaced: (what, the commands to try, best first) per
    qdisc. The kernel's defaults come back by themselves, so nothing when not forced."""
    if not forced:
        return []
    root = root_qdisc(saved_show)
    plans = []
    if root is not None and root.kind not in DEFAULT_ROOT_QDISCS:
        plans.append((f"root qdisc {root.kind}",
                      [["tc", "qdisc", "replace", "dev", dev, "root", *args]
                       for args in restore_args(root)]))
    ingress = ingress_qdisc(saved_show)
    if ingress is not None:
        plans.append((f"{ingress.kind} qdisc (without its filters)",
                       [["tc", "qdisc", "add", "dev", dev, "handle", INGRESS_HANDLE,
                         ingress.kind]]))
    return plans
