"""The playground in a real browser: Debian's chromium, headless, driven by Playwright, against the real server
process on the tiny Llama with two adapters (calm, bold).

What it checks, as a person would use the page (with the page's own Content-Security-Policy in force):

* Compare: dial a two-adapter blend with the sliders (by keyboard), stream three panes (base, an adapter, the
  blend); each pane's final greedy text equals what the API answers for the same request (replayed without
  streaming); each pane shows the sampling settings and the seed that were sent, and its TTFT and tokens/s.
* Dial: sweep one adapter's weight over six values; one answer per weight, from 0 to the top weight, each equal
  to the API's answer for that weight.
* Save: saving a blend without the admin key shows the server's 401 and says where the key goes; with the key
  it is saved and listed in ``/v1/models``; downloading it gives one peft adapter (a zip).
* Adapters: the table lists the registered adapters; an upload (file chooser) registers a new one; an invalid
  one (dropped on the drop zone) shows the server's validation error as the API returns it.
* Keyboard and accessibility: the main action is reachable and usable with the keyboard alone (and Ctrl+Enter
  sends), the tabs follow the arrow keys, panes can be added up to four and removed, the live view charts the
  stances that served, and axe-core finds no serious or critical violation (WCAG 2.x A/AA rules, colour
  contrast included) in any view.

Screenshots of the compare and sweep views are saved under the test's output folder; with
``STANCESERVE_DOCS_SCREENSHOTS=1`` they are also written to ``docs/img/`` (the user docs show them).
Without chromium the test skips, except where ``STANCESERVE_REQUIRE_BROWSER=1`` (``.ci/run`` sets it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.factories import REPO, calm_and_bold, edit_config, write_peft_adapter
from tests.server import ADMIN_KEY, AUTH, start_server, upload

pytestmark = pytest.mark.slow

#: Flags for a headless chromium that reaches nothing but the test server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_IMG = REPO / "docs" / "img"
TIMEOUT_MS = 30_000
MAX_TOKENS = 20
BLEND = {"calm": 0.6, "bold": -0.35}


def _chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        if os.environ.get("STANCESERVE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed, and STANCESERVE_REQUIRE_BROWSER=1: run `make chromium`")
        pytest.skip("Debian's chromium is not installed: run `make chromium` (CI does, and requires this test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("playground")
    with start_server(work) as srv:
        for name, folder in calm_and_bold(work / "peft").items():
            r = upload(srv.base, name, folder)
            assert r.status_code == 201, r.text
        yield srv


class Page:
    """A fresh browser page on the playground, with the chat requests it sends and any page error recorded."""

    def __init__(self, browser, base: str) -> None:
        self.ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.base = base
        self.chats: list[dict] = []
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)

    def _console(self, msg) -> None:
        if msg.type == "error" and not re.search(r"status of 4\d\d", msg.text):  # the 401/422 the test asks for
            self.problems.append(f"console: {msg.text}")

    def _request(self, req) -> None:
        if req.method == "POST" and req.url.endswith("/v1/chat/completions"):
            self.chats.append(json.loads(req.post_data))

    def open(self, hash_: str = "") -> Page:
        self.page.goto(f"{self.base}/{hash_}")
        assert re.search(r"/playground/(#\w+)?$", self.page.url), self.page.url
        self.page.locator("body[data-ready=true]").wait_for()
        return self

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def web(browser, server):
    page = Page(browser, server.base)
    yield page
    page.close()
    assert page.problems == []


def _expect():
    """Playwright's ``expect``, waiting as long as the page's own calls may (its default is 5 s)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return expect


def api_text(base: str, body: dict) -> str:
    """The text the API answers for the body the page streamed, asked again without streaming."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = httpx.post(f"{base}/v1/chat/completions", json=plain, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def screenshot(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    if os.environ.get("STANCESERVE_DOCS_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, DOCS_IMG / name)
    return out


def set_sampling(page, max_tokens: int = MAX_TOKENS, seed: str = "") -> None:
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Seed").fill(seed)
    page.get_by_label("Turn 1 text").fill("Once upon a time, a little fox")


def slide(slider, to: float) -> None:
    """Move a range input to ``to`` with the arrow keys (step 0.05), as a keyboard user would."""
    steps = round((to - float(slider.input_value())) / 0.05)
    slider.focus()
    for _ in range(abs(steps)):
        slider.press("ArrowRight" if steps > 0 else "ArrowLeft")
    assert float(slider.input_value()) == pytest.approx(to)


# ---------------------------------------------------------------------------- compare
def test_compare_streams_three_panes_with_the_api_s_greedy_text(web, tmp_path):
    expect = _expect()
    page = web.open().page
    set_sampling(page)
    panes = page.locator(".pane")
    expect(panes).to_have_count(3)
    p1, p2, p3 = panes.nth(0), panes.nth(1), panes.nth(2)
    p1.get_by_label("Stance").select_option(label="tiny-llama (no adapter)")
    p2.get_by_label("Stance").select_option(label="calm")
    p3.get_by_label("Stance").select_option(label="Dial a blend with sliders")
    # a two-adapter blend, set with the sliders
    slide(p3.get_by_label("calm", exact=True), BLEND["calm"])
    slide(p3.get_by_label("bold", exact=True), BLEND["bold"])
    expect(p3.locator(".blend-summary")).to_have_text("Blend: bold −0.35 + calm 0.60")

    page.get_by_role("button", name="Send to every pane").click()
    expect(page.locator(".pane[data-state=done]")).to_have_count(3)

    assert len(web.chats) == 3
    by_pane = {
        0: next(b for b in web.chats if b["model"] == "tiny-llama" and "stances" not in b),
        1: next(b for b in web.chats if b["model"] == "calm"),
        2: next(b for b in web.chats if "stances" in b),
    }
    assert by_pane[2]["stances"] == BLEND and by_pane[2]["model"] == "tiny-llama"
    seeds = {b["seed"] for b in web.chats}
    assert len(seeds) == 1  # one seed per run, the same for every pane
    texts = set()
    for i, body in by_pane.items():
        pane = panes.nth(i)
        assert body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0 and body["stream"] is True
        assert body["messages"] == [{"role": "user", "content": "Once upon a time, a little fox"}]
        shown = pane.locator(".output").text_content()
        assert shown and shown == api_text(web.base, body), f"pane {i + 1}"
        texts.add(shown)
        settings = pane.locator(".settings").text_content()
        assert f"seed {body['seed']}" in settings and f"max_tokens {MAX_TOKENS}" in settings
        assert "temperature 0" in settings
        assert re.fullmatch(r"TTFT \d+ ms · [\d.]+ tokens/s · \d+ tokens · finish: (length|stop)",
                            pane.locator(".stats").text_content())
    assert len(texts) == 3  # three stances, three different answers
    screenshot(page, tmp_path, "playground-compare.png")


# ---------------------------------------------------------------------------- dial
def test_dial_sweeps_one_answer_per_weight(web, tmp_path):
    expect = _expect()
    page = web.open("#dial").page
    expect(page.get_by_role("tab", name="Dial")).to_have_attribute("aria-selected", "true")
    set_sampling(page, seed="7")
    page.get_by_label("Adapter", exact=True).select_option("calm")
    page.get_by_label("Top weight").fill("1")
    page.get_by_label("Values").select_option("6")
    page.get_by_role("button", name="Sweep the weight").click()
    cards = page.locator(".sweep-card")
    expect(cards).to_have_count(6)
    expect(page.locator(".sweep-card[data-state=done]")).to_have_count(6)
    weights = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert [float(cards.nth(i).get_attribute("data-weight")) for i in range(6)] == weights
    assert [cards.nth(i).locator("h3").text_content() for i in range(6)] == [
        "w = 0.00 (base)", "w = 0.20", "w = 0.40", "w = 0.60", "w = 0.80", "w = 1.00"]
    assert len(web.chats) == 6
    sent = {b.get("stances", {}).get("calm", 0.0): b for b in web.chats}
    assert sorted(sent) == weights and "stances" not in sent[0.0]
    for i, w in enumerate(weights):
        body = sent[w]
        assert body["seed"] == 7 and body["model"] == "tiny-llama"
        assert cards.nth(i).locator(".output").text_content() == api_text(web.base, body), f"w = {w}"
        assert "seed 7" in cards.nth(i).locator(".settings").text_content()
    assert cards.nth(0).locator(".output").text_content() != cards.nth(5).locator(".output").text_content()
    screenshot(page, tmp_path, "playground-sweep.png")


# ---------------------------------------------------------------------------- save and download
def test_save_a_blend_as_a_named_stance_and_download_it(web, server):
    expect = _expect()
    page = web.open().page
    pane = page.locator(".pane").nth(2)
    pane.get_by_label("Stance").select_option(label="Dial a blend with sliders")
    slide(pane.get_by_label("calm", exact=True), BLEND["calm"])
    slide(pane.get_by_label("bold", exact=True), BLEND["bold"])
    pane.get_by_text("Save or download this blend").click()
    pane.get_by_label("Name").fill("fox-blend")
    status = pane.locator(".save-status")
    expect(page.locator("#admin-note")).to_contain_text("This server asks for the admin key to save, download and upload")

    pane.get_by_role("button", name="Save as a named stance").click()  # no admin key yet: the server's 401
    refused = httpx.post(f"{server.base}/v1/stances", json={"name": "fox-blend", "stances": BLEND}, timeout=10)
    assert refused.status_code == 401
    expect(status.locator(".message")).to_have_text(refused.json()["error"]["message"])
    expect(status).to_contain_text(f"HTTP 401 · {refused.json()['error']['code']}")
    expect(status).to_contain_text("enter it in “Admin key”")

    page.get_by_label("Admin key").fill(ADMIN_KEY)
    pane.get_by_role("button", name="Save as a named stance").click()
    expect(status).to_contain_text("Saved “fox-blend” (version 1)")
    cards = {m["id"]: m for m in httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"]}
    assert cards["fox-blend"]["stances"] == BLEND
    # every pane now offers it
    assert page.locator(".pane").nth(0).get_by_label("Stance").locator("option", has_text="fox-blend").count() == 1

    with page.expect_download() as dl:
        pane.get_by_role("button", name="Download as a peft adapter").click()
    download = dl.value
    assert download.suggested_filename == "fox-blend.zip"
    with zipfile.ZipFile(io.BytesIO(Path(download.path()).read_bytes())) as z:
        assert {"adapter_config.json", "adapter_model.safetensors", "export_blend.json"} <= set(z.namelist())
        assert json.loads(z.read("export_blend.json"))["stances"] == BLEND
    expect(status).to_contain_text("Downloaded fox-blend.zip")


# ---------------------------------------------------------------------------- adapters
def _drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """Drop ``files`` (name -> bytes) on the element ``selector``, as a drag from the desktop does."""
    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    dt = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], name));
            }
            return dt;
        }""",
        payload,
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": dt})


def test_upload_an_adapter_and_see_the_server_s_validation_error(web, server, tmp_path):
    expect = _expect()
    page = web.open("#adapters").page
    rows = page.locator("#adapters-table tbody tr")
    expect(rows).to_have_count(2)
    calm = page.locator("#adapters-table tbody tr", has_text="calm")
    expect(calm.locator("td").nth(1)).to_have_text("4")  # version, rank, alpha, targets, size... per adapter
    expect(calm).to_contain_text("q_proj")
    page.get_by_label("Admin key").fill(ADMIN_KEY)

    good = write_peft_adapter(tmp_path / "warm", rank=2, seed=21, scale=0.5)
    form = page.locator("#upload-form")
    form.get_by_label("Name", exact=True).fill("warm")
    page.get_by_label("Drop the files here, or choose them").set_input_files(
        [str(good / "adapter_config.json"), str(good / "adapter_model.safetensors")])
    page.get_by_role("button", name="Upload").click()
    status = page.locator("#upload-status")
    expect(status).to_contain_text("Registered “warm” (version 1, rank 2")
    expect(rows).to_have_count(3)
    assert "warm" in {m["id"] for m in httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"]}

    bad = write_peft_adapter(tmp_path / "bad", rank=2, seed=22, scale=0.5)
    edit_config(bad, use_dora=True)
    files = {f: (bad / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    want = httpx.post(f"{server.base}/v1/adapters", data={"name": "bad"}, files=[("files", (n, b)) for n, b in files.items()],
                      headers=AUTH, timeout=30)
    assert want.status_code == 422, want.text
    error = want.json()["error"]
    form.get_by_label("Name", exact=True).fill("bad")
    _drop_files(page, "#dropzone", files)
    expect(page.locator("#upload-chosen")).to_contain_text("adapter_config.json")
    page.get_by_role("button", name="Upload").click()
    expect(status).to_have_class(re.compile(r"\berror\b"))
    assert status.locator(".message").text_content() == error["message"]
    assert f"HTTP 422 · {error['code']}" in status.text_content()
    expect(rows).to_have_count(3)


# ---------------------------------------------------------------------------- keyboard and accessibility
def axe_violations(page) -> list[dict]:
    from axe_playwright_python.base import AXE_SCRIPT

    page.evaluate(AXE_SCRIPT)
    result = page.evaluate(
        """() => axe.run(document, {runOnly: {type: "tag", values:
             ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]}, resultTypes: ["violations"]})"""
    )
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5], "help": v["help"]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]


def test_keyboard_only_use_and_no_serious_accessibility_violation(web):
    expect = _expect()
    page = web.open().page
    page.get_by_label("Max tokens").fill("8")
    # from the top of the page, Tab reaches the main action; Enter runs it
    page.locator("body").focus()
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "run-compare":
            break
    else:
        pytest.fail("Tab never reached 'Send to every pane'")
    page.keyboard.press("Enter")
    expect(page.locator(".pane[data-state=done]")).to_have_count(3)
    # Ctrl+Enter in the prompt sends too
    web.chats.clear()
    page.get_by_label("Turn 1 text").press("Control+Enter")
    for _ in range(200):
        if len(web.chats) == 3:
            break
        page.wait_for_timeout(50)
    assert len(web.chats) == 3
    expect(page.locator(".pane[data-state=done]")).to_have_count(3)

    # two to four panes
    page.get_by_role("button", name="Add a pane").click()
    expect(page.locator(".pane")).to_have_count(4)
    expect(page.get_by_role("button", name="Add a pane")).to_be_disabled()
    page.get_by_role("button", name="Remove pane 4").click()
    expect(page.locator(".pane")).to_have_count(3)

    # the check can fail: an input without a label is a critical violation
    page.evaluate("() => document.querySelector('main').append(Object.assign(document.createElement('input'), "
                  "{id: 'axe-canary'}))")
    assert "label" in {v["id"] for v in axe_violations(page)}
    page.evaluate("() => document.getElementById('axe-canary').remove()")

    page.locator(".pane").nth(2).get_by_text("Save or download this blend").click()  # the open disclosure too
    found = {"compare": axe_violations(page)}
    tab = page.get_by_role("tab", name="Compare")
    tab.focus()
    for name in ("dial", "adapters", "live"):
        page.keyboard.press("ArrowRight")
        expect(page.locator(f"#panel-{name}")).to_be_visible()
        expect(page.locator(f"#tab-{name}")).to_be_focused()
        if name == "live":  # a chart per stance that served: tokens/s and TTFT, from GET /metrics/stances
            chart = page.locator('.chart-card[data-stance="blend"]')
            expect(chart.locator("svg polyline, svg circle").first).to_be_attached()
            expect(chart).to_contain_text("Tokens per second: now")
            expect(chart).to_contain_text("Time to first token: last")
        found[name] = axe_violations(page)
    assert found == {"compare": [], "dial": [], "adapters": [], "live": []}
