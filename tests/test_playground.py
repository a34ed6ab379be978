"""The playground page (`GET /` of `dgemma serve`) in a real browser: Playwright drives the system Chromium against
a real server process with the shipped default model. A chat turn through the page streams a reply equal to
what the API returns for the same request, animates the canvas from the denoising frames, fills the stats line,
replays; a second turn reuses the conversation; the page fits a 360 px phone screen.

Screenshots go to pytest's tmp dir; with DGEMMA_SCREENSHOTS=docs also to docs/playground.png and
docs/playground-phone.png. Skips cleanly without the `playwright` package or a `chromium` binary."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a system chromium (apt-get install chromium)")

from serving import ServerProcess  # noqa: E402

KEY = "playground-key"
NAME = "dgemma-default"
SETTINGS = {"steps": "6", "max-tokens": "40", "seed": "7", "interval": "0"}    # small, fast, every frame sent
DOCS = Path(__file__).resolve().parents[1] / "docs"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("playground") / "server.log", "wb")
    srv = ServerProcess("--api-key", KEY, "--max-batch", "2", "--prefill-chunk", "32", log=log).wait_ready()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def api_reply(server, messages: list[dict]) -> str:
    """The same request the page sends, without streaming: the text the page must show."""
    body = {"model": NAME, "messages": messages, "max_tokens": 40, "max_denoising_steps": 6, "seed": 7,
            "temperature": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def open_page(browser, server, errors: list, **context):
    page = browser.new_context(**context).new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    return page


def turn(page, text: str, n: int) -> str:
    """Type a prompt, click send, wait until the page is idle with n replies; return the last reply's text."""
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=WAIT_MS)
    status = page.text_content("#status")
    assert page.locator(".msg.assistant").count() == n, f"no reply; status: {status}"
    assert status == "idle"
    return page.locator(".msg.assistant").nth(n - 1).text_content()


def check_canvas_and_stats(page) -> int:
    frames = int(page.get_attribute("#canvas", "data-frames"))
    assert frames > 0
    cells = page.locator("#canvas .tok")
    assert cells.count() > 0
    classes = set(" ".join(cells.evaluate_all("els => els.map(e => e.className)")).split())
    assert classes & {"noise", "accepted", "committed"}
    assert "committed" in classes                    # the last frame of a reply is a committed canvas
    stats = page.text_content("#stats")
    assert re.search(r"\d+ tokens · [\d.]+ s · [\d.]+ tok/s", stats), stats
    assert "first text" in stats and "cached" in stats
    return frames


def screenshot(page, tmp_path: Path, name: str, **kw) -> None:
    page.screenshot(path=str(tmp_path / name), **kw)
    if os.environ.get("DGEMMA_SCREENSHOTS") == "docs":
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / name), **kw)


def test_desktop_chat_canvas_replay(server, browser, tmp_path):
    errors: list[str] = []
    page = open_page(browser, server, errors, viewport={"width": 1280, "height": 800})
    assert page.title() == "dgemma playground"
    # the server wants a key: the page says so until one is entered in the settings
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('error')", timeout=WAIT_MS)
    page.fill("#api-key", KEY)
    for field, value in SETTINGS.items():
        page.fill("#" + field, value)

    prompt = "Write <b>one</b> line about the sea & sky."
    reply = turn(page, prompt, 1)
    assert page.locator(".msg.user").first.text_content() == prompt       # shown as text, not parsed as HTML
    assert page.locator("#messages b").count() == 0
    assert reply == api_reply(server, [{"role": "user", "content": prompt}])
    assert page.text_content("#model") == f"model: {NAME}"
    frames = check_canvas_and_stats(page)

    page.click("#replay")                             # replays the recorded frames, ending at the same count
    page.wait_for_function(f"document.querySelector('#canvas').dataset.frames === '{frames}' && "
                           "document.querySelector('#status').textContent === 'idle'", timeout=WAIT_MS)

    # a second turn sends the whole conversation (its prompt starts with the first turn: prefix reuse)
    reply2 = turn(page, "And one more.", 2)
    assert reply2 == api_reply(server, [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply},
                                        {"role": "user", "content": "And one more."}])
    check_canvas_and_stats(page)
    assert re.search(r"\((\d+) cached\)", page.text_content("#stats"))
    # the slider shows one recorded frame, here the last pass before the final canvas commits (not counted)
    frames = page.get_attribute("#canvas", "data-frames")
    final = re.match(r"canvas (\d+) · step (\d+) \(final\)", page.text_content("#canvas-info"))
    page.locator("#scrub").evaluate("s => { s.value = s.max - 1; s.dispatchEvent(new Event('input')); }")
    last = re.match(r"canvas (\d+) · step (\d+) · accepted", page.text_content("#canvas-info"))
    assert final and last and final.groups() == last.groups()     # the commit comes after the canvas's last pass
    assert page.get_attribute("#canvas", "data-frames") == frames
    screenshot(page, tmp_path, "playground.png")

    page.click("#reset")
    assert page.locator(".msg").count() == 0 and page.get_attribute("#canvas", "data-frames") == "0"
    assert not errors, errors


def test_phone_width(server, browser, tmp_path):
    errors: list[str] = []
    # settings (and the key) come from localStorage, as a returning visitor's would
    saved = json.dumps({**SETTINGS, "api-key": KEY})
    ctx = {"viewport": {"width": 360, "height": 740}, "device_scale_factor": 2, "is_mobile": True,
           "has_touch": True}
    page = browser.new_context(**ctx).new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(f"localStorage.setItem('dgemma.playground', {json.dumps(saved)})")
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').textContent.includes('dgemma')", timeout=WAIT_MS)
    assert page.input_value("#steps") == "6"
    assert not page.evaluate("document.querySelector('#settings').open")             # folded on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 360

    reply = turn(page, "Hello from a phone.", 1)
    assert reply.strip() and reply == api_reply(server, [{"role": "user", "content": "Hello from a phone."}])
    check_canvas_and_stats(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360               # no horizontal overflow
    page.evaluate("document.querySelector('#settings').open = true")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    screenshot(page, tmp_path, "playground-phone.png", full_page=True)
    assert not errors, errors
