"""The plans that shape real boxes' links (testbed/boxes/tc_plan.py): pure, no root."""

from __future__ import annotations

import pytest

from testbed.boxes import tc_plan
from testbed.boxes.shaper import check_scenario_fits
from testbed.boxes.tc_plan import FALLBACK, NETEM, RELAYS, Box
from testbed.links.spec import LinkShape, TestbedError

BOXES = [Box(0, "10.0.0.2"), Box(1, "10.0.0.3")]


def test_choose_backend():
    assert tc_plan.choose_backend(True, True, "auto") == NETEM
    assert tc_plan.choose_backend(True, False, "auto") == FALLBACK
    assert tc_plan.choose_backend(False, True, "auto") == RELAYS
    assert tc_plan.choose_backend(False, False, "relays") == RELAYS
    assert tc_plan.choose_backend(True, True, "htb+nft+relay") == FALLBACK
    with pytest.raises(TestbedError, match="no netem"):
        tc_plan.choose_backend(True, False, "netem")
    with pytest.raises(TestbedError, match="needs root"):
        tc_plan.choose_backend(False, True, "netem")
    with pytest.raises(TestbedError, match="expected one of"):
        tc_plan.choose_backend(True, True, "tbf")


def test_ifb_name_is_ours_short_and_stable():
    name = tc_plan.ifb_name("enp3s0f0np0")
    assert name.startswith("wdifb") and len(name) <= 15
    assert name == tc_plan.ifb_name("enp3s0f0np0") != tc_plan.ifb_name("eth0")


def test_netem_plan_classes_leaves_and_filters():
    shapes = {0: LinkShape(delay_ms=30, jitter_ms=5, loss_pct=2, rate_mbit=20),
              1: LinkShape(down=True, wire_down_mbit=50, wire_up_mbit=5)}
    down = tc_plan.tree_plan("eth1", "down", BOXES, shapes, NETEM)
    # htb with no default: what is not a box's (ssh, DNS, ...) is sent directly, untouched
    assert down[0] == ["tc", "qdisc", "replace", "dev", "eth1", "root", "handle", "1:", "htb",
                       "direct_qlen", "10000"]
    assert "default" not in down[0]
    cls0, leaf0, filter0 = down[1:4]
    assert cls0[:9] == ["tc", "class", "add", "dev", "eth1", "parent", "1:", "classid", "1:10"]
    assert cls0[9:14] == ["htb", "rate", "20000kbit", "ceil", "20000kbit"]
    assert leaf0 == ["tc", "qdisc", "add", "dev", "eth1", "parent", "1:10", "handle", "10:",
                     "netem", "delay", "30ms", "5ms", "loss", "2%", "limit", "100000"]
    assert filter0 == ["tc", "filter", "add", "dev", "eth1", "parent", "1:", "protocol", "ip",
                       "prio", "1", "u32", "match", "ip", "dst", "10.0.0.2/32", "flowid", "1:10"]
    cls1, leaf1, filter1 = down[4:7]
    assert cls1[11] == "50000kbit"  # the down direction's own rate
    assert leaf1[9:] == ["netem", "loss", "100%", "limit", "10000"]  # down: all lost
    assert filter1[-4:] == ["dst", "10.0.0.3/32", "flowid", "1:11"]
    ifb = tc_plan.ifb_name("eth1")
    up = tc_plan.tree_plan(ifb, "up", BOXES, shapes, NETEM)
    assert up[4][11] == "5000kbit" and up[6][-4:] == ["src", "10.0.0.3/32", "flowid", "1:11"]


def test_unlimited_link_gets_a_high_ceiling_and_a_usable_burst():
    (cls,) = [c for c in tc_plan.tree_plan("eth1", "down", BOXES[:1], {}, NETEM)
              if c[1] == "class"]
    args = dict(zip(cls[10::2], cls[11::2]))
    assert args["rate"] == args["ceil"] == "10000000kbit"
    assert int(args["burst"]) >= 64 * 1024  # htb's own burst rounds to 0 at 10 Gbit/s


def test_ifb_plan_redirects_everything_received():
    ifb = tc_plan.ifb_name("eth1")
    assert tc_plan.ifb_plan("eth1") == [
        ["ip", "link", "add", ifb, "type", "ifb"],
        ["ip", "link", "set", ifb, "up"],
        ["tc", "qdisc", "add", "dev", "eth1", "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", "eth1", "parent", "ffff:", "protocol", "all", "prio", "1",
         "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb]]


def test_fallback_plan_rates_only_and_nft_per_box():
    shapes = {0: LinkShape(delay_ms=30, loss_pct=2.5, rate_mbit=8), 1: LinkShape(down=True)}
    down = tc_plan.tree_plan("br0", "down", BOXES, shapes, FALLBACK)
    leaves = [c for c in down if c[1] == "qdisc" and "parent" in c and c[6] != "1:"]
    assert all(c[9:] == ["pfifo", "limit", "10000"] for c in leaves)  # no netem anywhere
    assert not any("netem" in c for c in down)
    script = tc_plan.nft_script("br0", BOXES, shapes)
    table = tc_plan.nft_table("br0")
    assert table.startswith("wdmoe_shape_") and table != tc_plan.nft_table("br1")
    assert script.startswith(f"add table netdev {table}\ndelete table netdev {table}\n")
    assert 'type filter hook ingress device "br0"' in script
    assert 'type filter hook egress device "br0"' in script
    ingress, egress = script.split("chain egress")
    assert "ip saddr 10.0.0.2 numgen random mod 10000 < 250 drop" in ingress
    assert "ip saddr 10.0.0.3 drop" in ingress  # down: everything from it
    assert "ip daddr 10.0.0.2 numgen random mod 10000 < 250 drop" in egress
    assert "ip daddr 10.0.0.3 drop" in egress
    inet = tc_plan.nft_script("br0", BOXES, shapes, "inet")
    assert 'iifname "br0" ip saddr 10.0.0.3 drop' in inet
    assert 'oifname "br0" ip daddr 10.0.0.2 numgen' in inet
    assert "< 10000" not in tc_plan.nft_script("br0", BOXES, {0: LinkShape(loss_pct=100)})
    assert tc_plan.nft_needed(shapes) and not tc_plan.nft_needed({0: LinkShape(delay_ms=5)})


def test_change_plan_touches_only_what_differs():
    old = LinkShape(delay_ms=30, rate_mbit=8)
    assert tc_plan.change_plan("br0", BOXES[0], old, old, NETEM) == []
    ifb = tc_plan.ifb_name("br0")
    faster = tc_plan.change_plan("br0", BOXES[0], old, LinkShape(delay_ms=30, rate_mbit=16),
                                 FALLBACK)
    assert [(c[2], c[4], c[11]) for c in faster] == [("change", "br0", "16000kbit"),
                                                     ("change", ifb, "16000kbit")]
    # the fallback's delay lives in the relay: no tc change
    assert tc_plan.change_plan("br0", BOXES[0], old, LinkShape(delay_ms=5, rate_mbit=8),
                               FALLBACK) == []
    later = tc_plan.change_plan("br0", BOXES[0], old, LinkShape(delay_ms=5, rate_mbit=8), NETEM)
    assert [c[:5] for c in later] == [["tc", "qdisc", "change", "dev", "br0"],
                                      ["tc", "qdisc", "change", "dev", ifb]]


SHOW_BRIDGE = "qdisc noqueue 0: dev br0 root refcnt 2 \n"
SHOW_NIC = ("qdisc mq 0: root \nqdisc fq_codel 0: parent :2 limit 10240p flows 1024 quantum "
            "1514 target 5ms interval 100ms memory_limit 32Mb ecn drop_batch 64 \n"
            "qdisc fq_codel 0: parent :1 limit 10240p flows 1024 quantum 1514 target 5ms "
            "interval 100ms memory_limit 32Mb ecn drop_batch 64 \n")
SHOW_PFIFO_FAST = ("qdisc pfifo_fast 0: dev eth0 root refcnt 2 bands 3 priomap 1 2 2 2 1 2 0 0 1 "
                   "1 1 1 1 1 1 1\n")
SHOW_TBF = "qdisc tbf 8001: dev eth0 root refcnt 2 rate 1Mbit burst 32Kb lat 50ms \n"
SHOW_INGRESS = SHOW_PFIFO_FAST + "qdisc ingress ffff: dev eth0 parent ffff:fff1 ---------------- \n"
SHOW_CLSACT = SHOW_BRIDGE + "qdisc clsact ffff: dev br0 parent ffff:fff1 \n"
SHOW_OURS = ("qdisc htb 1: dev br0 root refcnt 2 r2q 10 default 0 direct_packets_stat 0 "
             "direct_qlen 10000\nqdisc pfifo 10: dev br0 parent 1:10 limit 10000p\n")


def test_default_qdiscs_are_recognised():
    for show in (SHOW_BRIDGE, SHOW_NIC, SHOW_PFIFO_FAST, ""):  # "" : a device that is down
        assert tc_plan.foreign_qdiscs(show) == [], show
    assert tc_plan.root_qdisc(SHOW_NIC).kind == "mq"
    assert tc_plan.foreign_qdiscs(SHOW_TBF) == ["root qdisc tbf 8001:"]
    assert tc_plan.foreign_qdiscs(SHOW_INGRESS) == ["ingress qdisc"]
    assert tc_plan.foreign_qdiscs(SHOW_CLSACT) == ["clsact qdisc"]
    assert tc_plan.foreign_qdiscs(SHOW_OURS) == ["root qdisc htb 1:"]


def test_teardown_and_restore_plans():
    made = {"root": True, "ingress": True, "ifb": "wdifb12345678", "ifb_root": "wdifb12345678",
            "nft": "netdev"}
    assert tc_plan.teardown_plan("eth0", made) == [
        ("root", ["tc", "qdisc", "del", "dev", "eth0", "root"]),
        ("ingress", ["tc", "qdisc", "del", "dev", "eth0", "ingress"]),
        ("ifb", ["ip", "link", "del", "wdifb12345678"]),
        ("nft", ["nft", "delete", "table", "netdev", tc_plan.nft_table("eth0")])]
    # an IFB that was there before stays; only our tree on it goes
    assert tc_plan.teardown_plan("eth0", {"ifb_root": "wdifbX"}) == [
        ("ifb_root", ["tc", "qdisc", "del", "dev", "wdifbX", "root"])]
    assert tc_plan.teardown_plan("eth0", {}) == []
    # defaults come back by themselves; a forced-over qdisc is put back, parameters first
    assert tc_plan.restore_plan("eth0", SHOW_PFIFO_FAST, forced=True) == []
    assert tc_plan.restore_plan("eth0", SHOW_TBF, forced=False) == []
    ((what, tries),) = tc_plan.restore_plan("eth0", SHOW_TBF, forced=True)
    assert what == "root qdisc tbf"
    assert tries == [["tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "8001:", "tbf",
                      "rate", "1Mbit", "burst", "32Kb", "lat", "50ms"],
                     ["tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "8001:", "tbf"]]
    ((what, tries),) = tc_plan.restore_plan("eth0", SHOW_INGRESS, forced=True)
    assert tries == [["tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"]]


def test_scenario_fit_check():
    from testbed import scenarios

    check_scenario_fits(scenarios.load("one-bad-link"), 1)  # names link 0
    check_scenario_fits(scenarios.load("flaky"), 2)  # names link 1
    with pytest.raises(TestbedError, match="shapes link 1, but the roster has 1 agent"):
        check_scenario_fits(scenarios.load("flaky"), 1)
    check_scenario_fits(scenarios.load("paper"), 2)  # a channel for any number of boxes


# -- a shared cell (issue 23): HTB classes under one parent -----------------------------------

def _class_args(cmd: list[str]) -> dict[str, str]:
    """A `tc class` command's parent, classid and htb parameters as a dict."""
    at = cmd.index("htb")
    return {"parent": cmd[cmd.index("parent") + 1], "classid": cmd[cmd.index("classid") + 1],
            **dict(zip(cmd[at + 1::2], cmd[at + 2::2]))}


def test_cell_plan_parent_class_children_borrow_up_to_the_cell():
    """16 mbit shared by 2: the cell's class 1:1 (rate = ceil = 16) under the root, each box
    guaranteed 8 and allowed 16; filters stay on the root (u32 reaches any leaf)."""
    down = tc_plan.tree_plan("br0", "down", BOXES, {}, FALLBACK, cell_mbit=16)
    assert down[0] == tc_plan.tree_plan("br0", "down", BOXES, {}, FALLBACK)[0]
    classes = [_class_args(c) for c in down if c[1] == "class"]
    assert classes[0] == {"parent": "1:", "classid": "1:1", "rate": "16000kbit",
                          "ceil": "16000kbit", "burst": "32768", "cburst": "32768",
                          "quantum": "65536"}
    for box, cls in zip(BOXES, classes[1:]):
        assert cls["parent"] == "1:1" and cls["classid"] == tc_plan.class_id(box.index)
        assert (cls["rate"], cls["ceil"]) == ("8000kbit", "16000kbit")
    filters = [c for c in down if c[1] == "filter"]
    assert [f[6] for f in filters] == ["1:", "1:"]
    assert [f[-1] for f in filters] == ["1:10", "1:11"]
    # a cell at 1 Gbit/s: cburst follows the ceiling (4 ms of it), burst the guaranteed rate
    (big,) = [_class_args(c) for c in tc_plan.tree_plan("br0", "down", BOXES[:1], {}, FALLBACK,
                                                        cell_mbit=1000) if c[1] == "class"][1:]
    assert big["rate"] == big["ceil"] == "1000000kbit" and big["cburst"] == "500000"


def test_cell_plan_each_direction_its_own_cell_and_own_rates_cap_the_ceiling():
    """A box's own lower rate caps what it may borrow (and its guarantee, when below B/N);
    the up tree on the IFB has its own cell of B (FDD-like), capped by the up rates."""
    shapes = {0: LinkShape(rate_mbit=12), 1: LinkShape(wire_down_mbit=5, wire_up_mbit=30)}
    down = [_class_args(c) for c in tc_plan.tree_plan("br0", "down", BOXES, shapes, NETEM,
                                                      cell_mbit=16) if c[1] == "class"]
    assert [(c["rate"], c["ceil"]) for c in down[1:]] == [("8000kbit", "12000kbit"),
                                                          ("5000kbit", "5000kbit")]
    ifb = tc_plan.ifb_name("br0")
    up = [_class_args(c) for c in tc_plan.tree_plan(ifb, "up", BOXES, shapes, NETEM,
                                                    cell_mbit=16) if c[1] == "class"]
    assert (up[0]["classid"], up[0]["rate"]) == ("1:1", "16000kbit")
    assert [(c["rate"], c["ceil"]) for c in up[1:]] == [("8000kbit", "12000kbit"),
                                                        ("8000kbit", "16000kbit")]
    assert tc_plan.cell_rates(16, 3, None) == (16 / 3, 16)
    assert tc_plan.cell_rates(16, 2, 4) == (4, 4)


def test_cell_change_plan_keeps_the_parent():
    """A new rate in a cell changes the box's class under 1:1 (a change under the root would
    take it out of the cell); nothing changes when the rate does not."""
    old = LinkShape(rate_mbit=8)
    assert tc_plan.change_plan("br0", BOXES[1], old, old, FALLBACK, 16, 2) == []
    cmds = tc_plan.change_plan("br0", BOXES[1], old, LinkShape(rate_mbit=4), FALLBACK, 16, 2)
    assert [(c[2], c[4]) for c in cmds] == [("change", "br0"), ("change", tc_plan.ifb_name("br0"))]
    for cmd in cmds:
        args = _class_args(cmd)
        assert (args["parent"], args["classid"]) == ("1:1", "1:11")
        assert (args["rate"], args["ceil"]) == ("4000kbit", "4000kbit")
    unlimited = _class_args(tc_plan.change_plan("br0", BOXES[1], old, LinkShape(), FALLBACK,
                                                16, 2)[0])
    assert (unlimited["rate"], unlimited["ceil"]) == ("8000kbit", "16000kbit")


def test_cell_must_be_a_rate_htb_can_make():
    tc_plan.check_cell(None)
    tc_plan.check_cell(0.5)
    for bad in (0, -16, float("nan"), float("inf"), 1e6):
        with pytest.raises(TestbedError, match="cell .* mbit: expected > 0"):
            tc_plan.check_cell(bad)
