"""The dashboard in a real headless Chromium (Debian's, driven by selenium) against a real
`basestation serve` behind the namespace testbed: every agent listed with a numeric RTT, a
degraded link's RTT rising on the page without a reload, θ's drops in the heatmap, the key
asked once and never put in a URL, and a banner when the server goes away (issue 25); with
replicas, every box holding an expert named and each replica's tokens shown (issue 24).

`WDMOE_SCREENSHOT=1` also saves docs/dashboard.png (the README's picture) while one link is
degraded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
from agent_fixtures import start_agent  # noqa: F401
from browser import attributes, number, start_browser, unavailable_reason
from test_links import run_links_cli
from test_serve import MODEL, ServerProcess, http
from waiting import wait_until

from testbed.links import control as links

WHY_NOT = unavailable_reason() or links.link_mode()[1]
pytestmark = [pytest.mark.root, pytest.mark.integration,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"no browser test: {WHY_NOT}")]

API_KEY = "dashboard-test-key"
AGENT_ARGS = ["--no-self-benchmark"]
DEGRADED = 1  # agent index whose link the test slows
DELAY_MS = 25  # one way: its round trip grows by 50 ms
RISE_MS = 25  # "well above": at least half the added round trip
THETA = 0.5  # k = 2 of 8 experts on two boxes: θ >= 0.5 always drops one
PAGE_WAIT_S = 60.0  # a page figure to follow the server, on a loaded 2-core machine
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "docs", "dashboard.png")
SCREENSHOT_MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def bed(tiny_split, tmp_path_factory):
    """Two agents (experts 0-3, 4-7) behind their own unshaped links; always torn down."""
    state_dir = str(tmp_path_factory.mktemp("dashboard") / "state")
    tb = links.up(tiny_split, 2, state_dir=state_dir, agent_args=AGENT_ARGS, mode=links.ROOT)
    try:
        yield tb
    finally:
        tb.down()


def start_serve(tb, tiny_split: str, *extra: str) -> ServerProcess:
    """`basestation serve` on a free port over the testbed's roster, reading its state file
    for the shaping it shows."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WDMOE_TESTBED_STATE", tb.state_dir)
        server = ServerProcess(["--shards", tiny_split, "--dtype", "float32", "--wait-s", "30",
                                "--agents", tb.roster_path, *extra])
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def keyed_server(bed, tiny_split):
    server = start_serve(bed, tiny_split, "--api-key", API_KEY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def driver():
    chromium = start_browser()
    try:
        yield chromium
    finally:
        chromium.quit()


class Traffic:
    """Chat requests in a thread, one after another, at `self.theta`, so the base station keeps
    measuring each link (the page's RTT is of one-token layer calls, not of probes)."""

    def __init__(self, url: str, api_key: str):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0,
                                    timeout=60)
        self.theta = 0.0
        self.answered: list[float] = []  # θ of each answered request
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            theta = self.theta
            try:
                self.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Tell me about links."}],
                    max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "theta": theta})
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
                return
            self.answered.append(theta)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(90)


def status(driver) -> str | None:
    banner = attributes(driver, "#status", "data-status")
    return banner[0]["data-status"] if banner else None  # None: the page is (re)loading


def agent_rtts(driver) -> dict[str, float | None]:
    """The page's agent cards: endpoint -> RTT p50 in ms (None: not measured yet)."""
    return {a["data-agent"]: number(a["data-rtt-ms"])
            for a in attributes(driver, ".agent[data-agent]", "data-agent", "data-rtt-ms")}


def all_agents_measured(driver, endpoints: list[str]) -> dict[str, float] | None:
    rtts = agent_rtts(driver)
    if sorted(rtts) == sorted(endpoints) and all(v is not None for v in rtts.values()):
        return rtts
    return None


def open_with_key(driver, url: str, endpoints: list[str]) -> dict[str, float]:
    """Opens the page, checks it asks for the key before showing anything, types the key and
    returns the agents' RTTs once every agent has one."""
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear();")
    driver.refresh()
    wait_until(lambda: status(driver) == "key-needed", PAGE_WAIT_S,
               what="the page to ask for the API key")
    form = driver.find_element("id", "key-form")
    assert form.is_displayed() and agent_rtts(driver) == {}
    driver.find_element("id", "api-key").send_keys(API_KEY + "\n")
    rtts = wait_until(lambda: all_agents_measured(driver, endpoints), PAGE_WAIT_S,
                      what=lambda: f"every agent with a numeric RTT; page shows "
                                   f"{agent_rtts(driver)}, status {status(driver)}")
    assert not form.is_displayed() and status(driver) == "connected"
    return rtts


def test_key_is_asked_once_and_kept_out_of_urls(bed, keyed_server, driver):
    with Traffic(keyed_server.url, API_KEY) as traffic:
        open_with_key(driver, keyed_server.url, sorted(set(bed.endpoints.values())))
    assert not traffic.errors
    driver.refresh()  # asked once: the tab keeps it
    wait_until(lambda: status(driver) == "connected", PAGE_WAIT_S,
               what=lambda: f"the reloaded page to connect; status {status(driver)}")
    assert not driver.find_element("id", "key-form").is_displayed()
    assert API_KEY not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('wdmoe-api-key')") == API_KEY
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and not any(API_KEY in name for name in resources)
    assert all(name.startswith(keyed_server.url) for name in resources)  # nothing from outside


def computed_below_routed(driver, endpoint: str) -> list[dict]:
    cells = attributes(driver, f'td[data-agent="{endpoint}"]', "data-layer", "data-expert",
                       "data-routed-share", "data-computed-share")
    return [c for c in cells
            if number(c["data-computed-share"]) < number(c["data-routed-share"])]


def test_degraded_link_and_theta_show_without_reload(bed, keyed_server, driver, tiny_split):
    """`testbed degrade` slows one link: its card's RTT rises on the open page; then requests at
    θ > 0 make the heatmap's computed share fall below the routed share for its experts, and
    the page's chat box streams an answer at that θ."""
    endpoints = sorted(set(bed.endpoints.values()))
    slowed = links.load_state(bed.state_dir)["agents"][DEGRADED]["endpoint"]
    with Traffic(keyed_server.url, API_KEY) as traffic:
        before = open_with_key(driver, keyed_server.url, endpoints)[slowed]
        degraded_s = time.monotonic()
        page_id = driver.execute_script("return window.wdmoePageId = Math.random();")
        assert run_links_cli("degrade", "--agent", str(DEGRADED), "--delay", f"{DELAY_MS}ms",
                             "--state-dir", bed.state_dir) == 0
        try:
            risen = wait_until(
                lambda: (agent_rtts(driver).get(slowed) or 0) >= before + RISE_MS
                and agent_rtts(driver)[slowed],
                PAGE_WAIT_S, interval_s=0.2,
                what=lambda: f"{slowed}'s RTT to rise from {before:.1f} ms by {RISE_MS} ms; "
                             f"page shows {agent_rtts(driver)}; errors {traffic.errors}")
            print(f"{slowed}: RTT p50 {before:.2f} ms, {risen:.2f} ms on the page "
                  f"{time.monotonic() - degraded_s:.1f} s after +{DELAY_MS} ms each way")
            assert driver.execute_script("return window.wdmoePageId") == page_id  # no reload

            assert not computed_below_routed(driver, slowed)  # θ = 0 is exact: nothing dropped
            traffic.theta = THETA
            cells = wait_until(lambda: computed_below_routed(driver, slowed), PAGE_WAIT_S,
                               interval_s=0.2,
                               what=lambda: f"a cell of {slowed}'s experts with computed < "
                                            f"routed share; errors {traffic.errors}")
            wait_until(lambda: THETA in traffic.answered or traffic.errors, PAGE_WAIT_S,
                       what="a request at θ > 0 answered")
            print(f"θ = {THETA}: computed < routed in {len(cells)} cells, e.g. {cells[0]}")
            toggle_shows_computed(driver)
            ask_on_page(driver)
            if os.environ.get("WDMOE_SCREENSHOT") == "1":
                save_screenshot(driver)
        finally:
            assert run_links_cli("degrade", "--agent", str(DEGRADED), "--clear",
                                 "--state-dir", bed.state_dir) == 0
    assert not traffic.errors


def toggle_shows_computed(driver) -> None:
    """The heatmap's toggle: data-share is the routed share by default, the computed one after."""
    def shares_are(view: str) -> bool:
        cells = attributes(driver, "td[data-layer]", "data-share", f"data-{view}-share")
        return bool(cells) and all(c["data-share"] == c[f"data-{view}-share"] for c in cells)

    assert shares_are("routed")
    driver.find_element("css selector", 'input[name="experts-view"][value="computed"]').click()
    wait_until(lambda: shares_are("computed"), PAGE_WAIT_S, what="the computed view")


def save_screenshot(driver) -> None:
    """docs/dashboard.png for the README (the whole page), written whole or not at all."""
    width, height = driver.execute_script(
        "return [window.outerWidth, document.documentElement.scrollHeight"
        " + window.outerHeight - window.innerHeight];")
    driver.set_window_size(width, height)
    png = driver.get_screenshot_as_png()
    with contextlib.suppress(ImportError):  # Pillow (matplotlib's): a palette PNG, smaller
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        png = out.getvalue()
    assert len(png) < SCREENSHOT_MAX_BYTES, f"screenshot {len(png)} bytes"
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    with open(SCREENSHOT + ".tmp", "wb") as f:
        f.write(png)
    os.replace(SCREENSHOT + ".tmp", SCREENSHOT)


def ask_on_page(driver) -> None:
    """The chat box streams an answer at θ through the API with the page's key; each token
    carries the gap before it as measured by the browser and is coloured by it."""
    for field, value in (("chat-theta", str(THETA)), ("chat-max-tokens", "6")):
        driver.find_element("id", field).clear()
        driver.find_element("id", field).send_keys(value)
    driver.find_element("id", "chat-input").send_keys("What is a queue?")
    driver.find_element("id", "chat-send").click()
    wait_until(lambda: "tokens in" in driver.find_element("id", "chat-stats").text, PAGE_WAIT_S,
               what=lambda: f"the answer; stats: {driver.find_element('id', 'chat-stats').text}")
    tokens = attributes(driver, ".tok", "data-gap-ms", "style")
    assert tokens and all(number(t["data-gap-ms"]) is not None for t in tokens)
    assert all("background" in (t["style"] or "") for t in tokens)
    assert f"θ {THETA:.2f}" in driver.find_element("id", "chat-stats").text  # the server's


def test_replicas_show_every_holder_and_their_tokens(driver, start_agent, tiny_split):  # noqa: F811
    """Experts 4-7 on two loopback agents (B, C) and 0-3 on one (A): after a completion, each
    replicated column names both boxes, each replica's card shows the replica tokens the state
    gives it, and a replica retry count shows in the summary only when non-zero."""
    def agent(spec: str) -> str:
        return start_agent("--expert", spec, "--shards", tiny_split, "--bind",
                           "tcp://127.0.0.1:*", *AGENT_ARGS).endpoint

    roster = {"A": ("0-3", agent("0-3")), "B": ("4-7", agent("4-7")), "C": ("4-7", agent("4-7"))}
    server = ServerProcess(["--shards", tiny_split, "--dtype", "float32", "--wait-s", "30",
                            *[a for spec, endpoint in roster.values()
                              for a in ("--agent", f"{spec}={endpoint}")]])
    try:
        server.wait_ready()
        code, answer = http(server.url + "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Tell me about boxes."}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert code == 200, answer
        _, state = http(server.url + "/v1/wdmoe/state")  # no traffic from here on: it stays
        box = {a["agent"]: i for i, a in enumerate(state["agents"])}
        a_box, b_box, c_box = (box[roster[name][1]] for name in "ABC")
        replicas = {a["agent"]: a["replica_calls"] for a in state["agents"] if a["replica_calls"]}
        assert sorted(replicas) == sorted([roster["B"][1], roster["C"][1]])
        assert state["replica_retries"] == 0

        driver.get(server.url + "/")
        cards = wait_until(lambda: replica_cards(driver, replicas), PAGE_WAIT_S,
                           what=lambda: f"the replica cards to show {replicas}; page shows "
                                        f"{attributes(driver, '.agent', 'data-replica-tokens')}")
        print(f"replica tokens: {replicas}; cards {cards}")
        assert attributes(driver, f'.agent[data-agent="{roster["A"][1]}"]',
                          "data-replica-tokens") == [{"data-replica-tokens": None}]
        for endpoint, calls in replicas.items():  # the card's row lists them, expert: count
            text = driver.find_element("css selector", f'.agent[data-agent="{endpoint}"]').text
            assert f"({sum(calls.values())} in all)" in text
            assert all(f"{e}: {n}" in text for e, n in calls.items())

        heads = {int(h["data-expert"]): h for h in attributes(
            driver, "th[data-expert]", "data-expert", "data-agents", "title", "class")}
        texts = driver.execute_script(
            "return [...document.querySelectorAll('th[data-expert]')].map(h => h.textContent)")
        for e, text in enumerate(texts):
            holders = [roster["A"][1]] if e < 4 else [roster["B"][1], roster["C"][1]]
            assert sorted(heads[e]["data-agents"].split()) == sorted(holders)
            assert text == (f"{e} · box {a_box}" if e < 4 else
                            f"{e} · boxes {min(b_box, c_box)}, {max(b_box, c_box)}")
            assert all(h in heads[e]["title"] for h in holders)
        cells = attributes(driver, "td[data-expert]", "data-expert", "data-agent",
                           "data-agents", "data-computed-share")
        for cell in cells:  # one holder: data-agent as before; a replicated expert: none
            e = int(cell["data-expert"])
            assert cell["data-agent"] == (roster["A"][1] if e < 4 else None)
            assert len(cell["data-agents"].split()) == (1 if e < 4 else 2)
        computed = {int(c["data-expert"]) for c in cells
                    if int(c["data-expert"]) >= 4 and number(c["data-computed-share"])}
        assert computed, "no replicated expert computed"
        for e in computed:  # computed on the page: some replica served it
            assert sum(calls.get(str(e), 0) for calls in replicas.values()) > 0, (e, replicas)

        assert "replica" not in driver.find_element("id", "summary").text
        shown = driver.execute_script(  # one render of a snapshot with retries, read at once
            "render({...page.snapshot, replica_retries: 3});"
            " return [$('summary').textContent, $('summary').dataset.replicaRetries];")
        assert shown[0].endswith("· 3 token groups re-sent to another replica"), shown
        assert shown[1] == "3"
    finally:
        server.stop()


def replica_cards(driver, replicas: dict[str, dict]) -> dict[str, float] | None:
    """The replica agents' data-replica-tokens once each equals its total in `replicas`."""
    cards = {a["data-agent"]: number(a["data-replica-tokens"]) for a in attributes(
        driver, ".agent[data-replica-tokens]", "data-agent", "data-replica-tokens")}
    want = {endpoint: float(sum(calls.values())) for endpoint, calls in replicas.items()}
    return cards if cards == want else None


def test_banner_when_the_server_goes_away(bed, keyed_server, driver):
    """Once serve stops, the open page says since when the server is unreachable. Last in this
    file: it stops the module's server (a second serve would cost half a minute to start)."""
    if not driver.current_url.startswith(keyed_server.url) or status(driver) != "connected":
        with Traffic(keyed_server.url, API_KEY):
            open_with_key(driver, keyed_server.url, sorted(set(bed.endpoints.values())))
    keyed_server.stop()
    wait_until(lambda: status(driver) == "disconnected", PAGE_WAIT_S,
               what=lambda: f"the disconnected banner; status {status(driver)}")
    text = driver.find_element("id", "status").text
    assert "server unreachable since" in text and "retrying" in text
