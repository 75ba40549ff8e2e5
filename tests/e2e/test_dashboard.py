"""The dashboard at `/` in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by selenium) on a real 3-rank llama.cpp RPC ring with API keys on.

One ring and one browser for the first checks, in order: the page (served without a key, not counted
as usage) asks for the key (again after a wrong one), then shows the three nodes serving; reloaded with the key kept,
it loads without a console error and its event panel follows /api/v1/events (the ring's start
replayed); the chat box streams an answer (its text grows over several DOM reads) and the tok/s
chart moves; after a kill -9 of a rank's engine the page shows the new generation serving again,
with the failure and the restart among its events. The browser's console is read through selenium's `get_log('browser')`.

Then the same browser on a second ring (no keys) whose rank 0 lacks the model file and gets it from a
worker at 40 Mbit/s (about 20 s for the test model): the page shows rank 0's transfer running
with a percentage between 0 and 100, its rate and ETA, and the model listed as
"transferring NN %", then the ring serving with the transfer done and the model loaded; `llm-agent status --watch` beside it prints the same delivery as its stage.

Screenshots are written to $DASHBOARD_SCREENSHOTS (default: a directory under pytest's tmp
dir) and their paths printed. Port offsets 1900, 4600 and 4650. Without Chromium the test is
skipped, unless LLM_CLUSTER_BROWSER_REQUIRED=1 (set by .ci/run), where it fails."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import Cluster, _env_path

OFFSET = 1900
TRANSFER_OFFSET = 4600
NO_ROOM_OFFSET = 4650
KEY = "sk-dashboard-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _browser_paths():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    if chromium and driver:
        return chromium, driver
    why = "Chromium or its driver is not installed (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("LLM_CLUSTER_BROWSER_REQUIRED") == "1":
        pytest.fail(why)
    pytest.skip(why + ": dashboard browser test SKIPPED")


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    keys = tmp / "keys.toml"
    keys.write_text(f'[[key]]\nname = "dash"\nkey = "{KEY}"\n')
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), OFFSET, tmp,
                      ("--api-keys", str(keys)))
    with cluster.serving() as c:
        yield c


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1300", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)

    def shot(browser, name):
        path = d / f"{name}.png"
        browser.save_screenshot(str(path))
        print(f"[screenshot] {path}")
    return shot


def poll(predicate, timeout, what, every=0.2):
    """Reads the DOM until `predicate` returns something true; the bound is generous, not a
    timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"the page did not show {what} within {timeout} s")


def by_id(browser, i):
    from selenium.webdriver.common.by import By
    return browser.find_element(By.ID, i)


def page_state(browser):
    """What the page shows, read from its DOM in one script."""
    return browser.execute_script("""
        const q = (s) => document.querySelector(s);
        return {
          phase: q('#phase').dataset.phase,
          generation: q('#generation').textContent,
          restarts: q('#restarts').textContent,
          model: q('#model').textContent,
          nodes: [...document.querySelectorAll('#nodes .node')].map((n) => n.dataset.state),
          ring: [...document.querySelectorAll('#ring .ring-node')].map((n) => [n.dataset.rank, n.dataset.state]),
          keyAsked: !q('#key-dialog').hidden,
          events: q('#events-state').textContent,
          eventKinds: [...document.querySelectorAll('#events li')].map((l) => l.dataset.kind),
        };""")


def serving_three(browser):
    s = page_state(browser)
    return s if s["phase"] == "serving" and s["nodes"] == ["running"] * 3 else None


def console(browser):
    return browser.get_log("browser")


def unexpected(entries, allow_401=False):
    """Console entries that are errors or warnings; a 401 is the browser's own network log line
    for the refused request that makes the page ask for the key."""
    return [e for e in entries if e["level"] in ("SEVERE", "WARNING")
            and not (allow_401 and e["source"] == "network" and "status of 401" in e["message"])]


def usage_requests(ring):
    u = requests.get(f"{ring.base}/api/v1/usage", headers=AUTH, timeout=5).json()
    return sum(k["requests"] for k in u["keys"].values())


def test_page_asks_for_the_key_then_shows_the_ring_serving(ring, browser, shots):
    r = requests.get(f"{ring.base}/", timeout=5)
    assert r.status_code == 200, "the page itself needs no key"
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe" not in csp, csp
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    assert requests.get(f"{ring.base}/api/v1/cluster", timeout=5).status_code == 401
    assert f"dashboard: {ring.base}/" in ring.stdout(), "up names the dashboard"
    before = usage_requests(ring)

    browser.get(f"{ring.base}/")
    poll(lambda: page_state(browser)["keyAsked"], 20, "the API key form")
    shots(browser, "01-key-asked")
    entries = console(browser)
    assert any("status of 401" in e["message"] for e in entries), entries
    assert not unexpected(entries, allow_401=True), entries

    # A wrong key is refused and asked for again; the right one is kept.
    by_id(browser, "key-input").send_keys("sk-wrong-0123456789abcdef")
    by_id(browser, "key-save").click()
    poll(lambda: page_state(browser)["keyAsked"] and "refused" in by_id(browser, "key-why").text, 20,
         "the key form again, saying the key was refused")
    time.sleep(0.5)  # the other requests refused with the wrong key
    assert not unexpected(console(browser), allow_401=True)
    by_id(browser, "key-input").send_keys(KEY)
    by_id(browser, "key-save").click()
    s = poll(lambda: serving_three(browser), 30, "three nodes running and the ring serving")
    assert not s["keyAsked"], "the key is asked once"
    assert s["ring"] == [["0", "running"], ["1", "running"], ["2", "running"]], s
    assert s["model"] == Path(_env_path("SMOLLM2_GGUF")).stem, s
    assert browser.execute_script("return localStorage.getItem('llm-cluster.api-key')") == KEY
    # The stylesheet applies under the page's CSP: running ranks are drawn green.
    fills = browser.execute_script(
        "return [...document.querySelectorAll('#ring circle')].map((c) => getComputedStyle(c).fill)")
    assert fills == ["rgb(47, 158, 107)"] * 3, fills
    facts = browser.execute_script("return document.querySelector('#nodes').textContent")
    for shown in ("engine", "model", "memory", "cpu", "network", "sha256"):
        assert shown in facts, f"node facts lack {shown}: {facts}"
    # Two usage polls at least, then: the page's own requests are not counted as usage.
    time.sleep(4.5)
    assert usage_requests(ring) == before, "the dashboard's requests counted against the gateway"
    assert not unexpected(console(browser)), "console errors after the key was given"


def test_page_loads_with_the_kept_key_without_console_errors(ring, browser, shots):
    console(browser)  # drops what was logged so far
    browser.refresh()
    s = poll(lambda: serving_three(browser), 30, "the ring serving after a reload")
    poll(lambda: page_state(browser)["events"] == "live", 15, "the events panel live")
    # The replay on connect: the ring's first start is among the events shown.
    kinds = poll(lambda: page_state(browser)["eventKinds"], 15, "events")
    assert "phase" in kinds, kinds
    time.sleep(2.5)  # a usage poll and a chart drawn
    s = page_state(browser)
    assert not s["keyAsked"], "a kept key is not asked again"
    entries = console(browser)
    assert not unexpected(entries), entries
    shots(browser, "02-serving")


def test_chat_box_streams_the_answer(ring, browser, shots):
    before = usage_requests(ring)
    box = by_id(browser, "chat-max")
    box.clear()
    box.send_keys("100")
    by_id(browser, "chat-input").send_keys("Tell me a long story about a lighthouse keeper and the sea.")
    by_id(browser, "chat-send").click()
    read = """const m = [...document.querySelectorAll('#chat-log .msg.assistant')].pop();
              return m ? [m.dataset.state, m.textContent,
                          document.querySelector('#tok-rate').textContent] : null;"""
    lengths, tok_rates = [], []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state, text, rate = browser.execute_script(read) or ("", "", "0")
        if not lengths or len(text) != lengths[-1]:
            lengths.append(len(text))
        tok_rates.append(float(rate))
        if state in ("done", "error"):
            break
        time.sleep(0.03)
    assert state == "done", f"the chat ended {state!r}: {text}"
    assert text.strip(), "an empty answer"
    growing = [n for n in lengths if n > 0]
    assert len(growing) >= 3 and growing == sorted(growing), f"text did not grow in steps: {lengths}"
    print(f"[figure] chat answer read at {len(growing)} growing lengths: {growing[:12]}...; {len(text)} chars")
    assert usage_requests(ring) == before + 1, "the chat is one request of the key"
    # The chart follows /api/v1/usage deltas: completion tokens/s above 0 at some poll.
    poll(lambda: tok_rates.append(float(by_id(browser, "tok-rate").text or 0)) or max(tok_rates) > 0,
         15, "completion tokens/s above 0")
    shots(browser, "03-chat")
    assert not unexpected(console(browser))


def test_a_killed_rank_shows_as_a_restart(ring, browser, shots):
    s = page_state(browser)
    generation, restarts = int(s["generation"]), int(s["restarts"])
    pid = requests.get(f"{ring.base}/api/v1/cluster", headers=AUTH, timeout=5).json()["nodes"][1]["status"]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    seen = set()

    def back():
        st = page_state(browser)
        seen.add((st["phase"], tuple(st["nodes"])))
        return int(st["generation"]) > generation and serving_three(browser)

    s = poll(back, 120, "a new generation serving after the kill", every=0.25)
    print(f"[figure] page shows generation {s['generation']} serving {time.monotonic() - killed:.1f} s after the kill "
          f"(states seen: {sorted(seen)})")
    assert int(s["restarts"]) > restarts, s
    kinds = poll(lambda: (k := page_state(browser)["eventKinds"]) and "restart" in k and k, 15,
                 "the restart among the events")
    assert "failure" in kinds, kinds
    print(f"[figure] event kinds shown, newest first: {kinds[:12]}")
    shots(browser, "04-restarted")
    assert not unexpected(console(browser))


def open_page(browser, base):
    """Opens `base`'s dashboard with the console drained of what earlier pages logged (a ring
    stopped under its open page makes it log refused connections)."""
    browser.get("about:blank")
    console(browser)
    browser.get(f"{base}/")


def transfer_rows(browser, rank):
    """Rank `rank`'s transfer rows on its node card: [state, percent, bar value, text]."""
    return browser.execute_script("""
        return [...document.querySelectorAll(`#nodes .node[data-rank="${arguments[0]}"] dd.transfer`)]
          .map((d) => [d.dataset.state, d.dataset.percent ?? null,
                       d.querySelector('progress')?.value ?? null, d.textContent]);""", rank)


def test_a_node_receiving_the_model_shows_its_progress_then_the_ring_serves(browser, shots, tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    empty = tmp_path / "rank0-models"
    empty.mkdir()
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), model, TRANSFER_OFFSET, tmp_path, extra=(
        "--node-model-dir", f"0={empty}", "--transfer-max-mbit", "40"))
    watch_out = tmp_path / "status-watch.out"
    watch = subprocess.Popen(
        [str(_env_path("LLM_AGENT_BIN")), "status", "--url", cluster.base, "--watch", "--timeout", "240"],
        stdout=open(watch_out, "w"), stderr=subprocess.STDOUT)
    try:
        open_page(browser, cluster.base)
        percents = []

        def mid_transfer():
            rows = [r for r in transfer_rows(browser, 0) if r[0] == "running"]
            for state, pct, bar, text in rows:
                if pct is not None:
                    percents.append(int(pct))
                    assert float(bar) == float(pct), (bar, pct)
                    if 0 < int(pct) < 100 and "MB/s" in text and "s left" in text:
                        return text
            return None

        text = poll(mid_transfer, 120, "rank 0's transfer running between 0 and 100 %", every=0.25)
        assert f"receiving model {model.stem} from rank " in text, text
        ring_label = browser.execute_script(
            "return document.querySelector('#ring .ring-node[data-rank=\"0\"] text.receiving')?.textContent")
        print(f"[figure] the page showed rank 0 receiving: {text!r}; ring label {ring_label!r}")
        assert ring_label and ring_label.startswith(f"receiving {model.stem} "), ring_label
        reason = browser.execute_script("return document.querySelector('#reason').textContent")
        assert "is receiving model" in reason, reason
        models_js = "return [...document.querySelectorAll('#models .model-state')].map((m) => m.dataset.state)"
        listed = poll(lambda: (m := browser.execute_script(models_js)) and m[0].startswith("transferring ") and m,
                      30, "the model listed as transferring NN %")
        assert re.fullmatch(r"transferring \d+ %", listed[0]), listed
        shots(browser, "05-receiving-the-model")

        def serving_reading_on():
            mid_transfer()  # the percentages shown on the way, which must move
            return serving_three(browser)

        poll(serving_reading_on, 180, "the ring serving once the model arrived", every=0.25)
        done = poll(lambda: [r for r in transfer_rows(browser, 0) if r[0] == "done"], 15, "the transfer done")
        assert poll(lambda: browser.execute_script(models_js) == ["loaded"], 15, "the model listed as loaded")
        assert done[0][1] == "100" and done[0][2] is None, done
        assert "sha256 verified" in done[0][3], done
        seen = sorted(set(percents))
        print(f"[figure] percentages the page showed for rank 0: {seen}")
        assert len([p for p in seen if 0 < p < 100]) >= 2, f"the bar did not move: {seen}"
        shots(browser, "06-delivered-and-serving")
        assert not unexpected(console(browser)), "console errors on the delivering ring's page"

        assert watch.wait(timeout=60) == 0, watch_out.read_text()
        out = watch_out.read_text()
        stages = re.findall(rf"… rank 0 receives model {re.escape(model.stem)} from rank \d: "
                            r"[\d.]+ [kMG]?B of [\d.]+ MB, [\d.]+ [kMG]?B/s, \d+ s left \((\d+) %\)", out)
        assert any(0 < int(p) < 100 for p in stages), out
        assert f"transfer: received model {model.stem} from rank " in out, out
        print(f"[figure] status --watch showed the delivery at {len(stages)} stages: {stages}")
    except Exception:
        print(cluster.log_tail())
        raise
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        cluster.stop()


def test_a_failed_delivery_shows_with_its_error(browser, shots, tmp_path, small_disk):
    model = _env_path("SMOLLM2_GGUF")
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), model, NO_ROOM_OFFSET, tmp_path, extra=(
        "--node-model-dir", f"0={small_disk}"))
    try:
        open_page(browser, cluster.base)
        rows = poll(lambda: [r for r in transfer_rows(browser, 0) if r[0] == "failed"], 60,
                    "rank 0's transfer failed")
        state, pct, bar, text = rows[0]
        assert bar is None, "no bar on a failed transfer"
        assert f"delivery of model {model.stem} from rank " in text and "not enough free space" in text, text
        assert re.search(r"\d+ bytes \([\d.]+ MB\) missing", text), text
        cls = browser.execute_script(
            "return document.querySelector('#nodes .node[data-rank=\"0\"] dd.transfer span').className")
        assert cls == "error", cls
        models = browser.execute_script(
            "return [...document.querySelectorAll('#models .model-state')].map((m) => m.dataset.state)")
        assert models == ["missing"], models
        print(f"[figure] the page showed: {text!r}")
        shots(browser, "07-delivery-failed")
        assert not unexpected(console(browser)), "console errors on the refused ring's page"
        r = subprocess.run([str(_env_path("LLM_AGENT_BIN")), "status", "--url", cluster.base],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 3, r
        assert f"    transfer: delivery of model {model.stem} from rank " in r.stdout, r.stdout
        assert f"     Models: {model.stem} missing on rank 0" in r.stdout, r.stdout
    except Exception:
        print(cluster.log_tail())
        raise
    finally:
        cluster.stop()
