"""`testbed shape | unshape` and `testbed degrade --roster`: real boxes' links, shaped from the
base station's interface (wired in by testbed/cli.py and testbed/links/cli.py)."""

from __future__ import annotations

import dataclasses
import os
import time

from testbed.boxes import shaper
from testbed.boxes.shaper import SHAPE_BACKENDS
from testbed.boxes.state import load_state, state_file
from testbed.links.spec import LinkShape, TestbedError

# shared with sweep's and eval's --shape-backend and --force (testbed/cli.py)
BACKEND_HELP = ("auto: netem where the kernel has it, else htb+nftables+relays as root, relays "
                "alone otherwise (no loss) (default auto)")
FORCE_HELP = "replace a qdisc DEV has that is not the kernel's default (put back afterwards)"


def _roster_agents(path: str):
    from basestation.roster import RosterError, read_roster_agents

    try:
        return read_roster_agents(path)
    except RosterError as e:
        raise TestbedError(str(e)) from None


def cmd_shape(args) -> int:
    from testbed import scenarios

    scenario = scenarios.load(args.scenario)
    num_links = len(_roster_agents(args.roster))
    shaper.check_scenario_fits(scenario, num_links)
    # `paper` too: its shapes only; real boxes compute at their own speed (no pacing)
    shapes = scenarios.shapes_at(scenario, num_links, 0.0)
    boxes = shaper.shape_boxes(args.roster, args.dev, shapes, backend=args.backend,
                               force=args.force, state_dir=args.state_dir,
                               answer_timeout_s=args.answer_timeout_s,
                               cell_mbit=args.cell_mbit)
    try:
        print(f"backend: {boxes.backend}  (state: {state_file(boxes.state_dir, boxes.dev)})")
        if boxes.cell_mbit is not None:
            print(cell_line(boxes.cell_mbit, num_links))
        for index, endpoint in enumerate(boxes.endpoints):
            print(f"link {index}  {endpoint}  [{boxes.shapes[index].describe()}]")
        print(f"roster: {boxes.roster_path}  (basestation ... --agents {boxes.roster_path})",
              flush=True)
        if not scenario.changes_over_time:
            print(f"shaped; `testbed unshape --dev {boxes.dev}` restores {boxes.dev}")
            return 0
        print(f"scenario {scenario.name} changes with time: re-applying it every "
              f"{scenario.step_s / 2:g} s until Ctrl-C or `testbed unshape --dev {boxes.dev}`",
              flush=True)
        _follow(boxes, scenario, num_links)
    except KeyboardInterrupt:
        removed = boxes.down()
        print(f"unshaped {boxes.dev}: removed " + ", ".join(removed))
        return 0
    except BaseException:
        boxes.down()
        raise
    return 0


def cell_line(cell_mbit: float, num_boxes: int) -> str:
    """What `shape --cell-mbit` says about the cell (each direction has one of its own)."""
    plural = "box" if num_boxes == 1 else "boxes"
    return (f"cell: {cell_mbit:.4g} mbit shared by {num_boxes} {plural} (each guaranteed "
            f"{cell_mbit / num_boxes:.4g}, may borrow up to {cell_mbit:.4g})")


def _follow(boxes: shaper.ShapedBoxes, scenario, num_links: int) -> None:
    """Apply the scenario's shapes as they change, forever (Ctrl-C / SIGTERM ends it)."""
    from testbed import scenarios

    start_s = time.monotonic()
    while True:
        time.sleep(scenario.step_s / 2)
        now = scenarios.shapes_at(scenario, num_links, time.monotonic() - start_s)
        for index, shape in now.items():
            if boxes.shapes.get(index) != shape:
                boxes.degrade(index, shape)
                print(f"link {index}: {shape.describe()}", flush=True)


def cmd_unshape(args) -> int:
    state_dir = args.state_dir or shaper.default_state_dir()
    removed = shaper.unshape(args.dev, state_dir)
    if removed:
        print(f"unshaped {args.dev}: removed " + ", ".join(removed))
    else:
        print(f"nothing shaped on {args.dev} (state in {state_dir})")
    return 0


def degrade_roster(args, changes: dict) -> int:
    """`testbed degrade --roster FILE --dev DEV ...`: one box's link, changed live. CHANGES:
    the LinkShape fields the flags set (parsed by testbed/links/cli.py). Raises
    TestbedError."""
    if not args.dev:
        raise TestbedError("--roster needs --dev DEV (the interface `testbed shape` shaped)")
    boxes = shaper.load_shaped(args.dev, args.state_dir)
    state_rosters = {os.path.realpath(p) for p in (boxes.roster_path, _source_roster(boxes))}
    if os.path.realpath(args.roster) not in state_rosters:
        raise TestbedError(f"{args.dev} is shaped for {sorted(state_rosters)[0]}, not "
                           f"{args.roster}")
    index = _link_index(args, boxes)
    shape = LinkShape() if args.clear else boxes.shapes[index]
    shape = dataclasses.replace(shape, **changes)
    boxes.degrade(index, shape)
    print(f"link {index} ({boxes.endpoints[index]}): {shape.describe()}")
    return 0


def _source_roster(boxes: shaper.ShapedBoxes) -> str:
    state = load_state(boxes.state_dir, boxes.dev)
    if state is None:
        raise TestbedError(f"nothing is shaped on {boxes.dev} any more")
    return state["roster_source"]


def _link_index(args, boxes: shaper.ShapedBoxes) -> int:
    """--expert N (the box hosting it), --agent INDEX or --agent ENDPOINT (the box's own or
    its relay's). Raises TestbedError."""
    agents = _roster_agents(args.roster)
    if args.expert is not None:
        hosting = [i for i, a in enumerate(agents) if args.expert in a.experts]
        if not hosting:
            raise TestbedError(f"no agent of {args.roster} hosts expert {args.expert}")
        return hosting[0]
    if args.agent.isdigit():
        index = int(args.agent)
        if index >= len(boxes.endpoints):
            raise TestbedError(f"no link {index} (links 0-{len(boxes.endpoints) - 1})")
        return index
    for index, (own, dialled) in enumerate(zip(boxes.endpoints, agents)):
        if args.agent in (own, dialled.endpoint):
            return index
    raise TestbedError(f"{args.agent}: not an endpoint of {args.roster} (links: "
                       f"{', '.join(boxes.endpoints)})")


def add_parsers(subparsers) -> None:
    """Add shape and unshape to an argparse subparsers object."""
    def state_dir(p) -> None:
        p.add_argument("--state-dir", default=None,
                       help=f"where the state goes (default ${shaper.STATE_ENV}, else "
                       "/run/wdmoe/shape as root, $XDG_RUNTIME_DIR/wdmoe-shape or "
                       "/tmp/wdmoe-shape-UID)")

    p = subparsers.add_parser(
        "shape", help="shape the links to real boxes (a roster's agents) from this machine's "
        "interface DEV, both directions, by each box's address; restore with unshape")
    p.add_argument("--roster", required=True, metavar="FILE",
                   help="the roster the base station dials (keys included); links are "
                   "numbered in its order")
    p.add_argument("--dev", required=True,
                   help="this machine's interface towards the boxes (with --backend relays it "
                   "only names the state: nothing on it is touched)")
    p.add_argument("--scenario", required=True, help="uniform | one-bad-link | flaky | paper | "
                   "FILE.toml (one that changes with time keeps this command running)")
    p.add_argument("--backend", choices=SHAPE_BACKENDS, default="auto", help=BACKEND_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--answer-timeout-s", type=float, default=shaper.ANSWER_TIMEOUT_S,
                   help="every agent must answer INFO within this before anything is shaped")
    p.add_argument("--cell-mbit", type=float, default=None, metavar="B",
                   help="the boxes share one cell of B mbit each way (HTB: each guaranteed "
                   "B/N, an idle box's share lent to the busy ones; a box's own scenario rate "
                   "still caps it); needs tc (not --backend relays)")
    state_dir(p)
    p.set_defaults(func=cmd_shape)

    p = subparsers.add_parser("unshape", help="undo `testbed shape` on DEV (also after it was "
                              "killed): DEV as it was, relays stopped")
    p.add_argument("--dev", required=True)
    state_dir(p)
    p.set_defaults(func=cmd_unshape)
