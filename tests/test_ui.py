"""The built-in chat page (vl2edge/ui.html at /) in a real headless Chromium, driven by Playwright.

The page is loaded from a live server, an image is picked and a prompt sent: the answer must stream in
(several updates of the text), grounding boxes must be drawn over the image, a second turn must carry the
conversation, and Stop must cancel the generation on the server. The first turn runs the random-weight
demo model; for the box and the stop the model is replaced by a scripted decoder that answers a known
grounding string (slowly, for the stop) — everything else (server, parser, page) is the real one.
Screenshots are saved next to the test's temporary files (their paths are printed).

Chromium comes from the Debian packages (`apt-get install chromium`; .ci/run installs it); without it the
test is skipped, unless VL2EDGE_REQUIRE_BROWSER=1 (set by .ci/run), where that is a failure.
"""

import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from PIL import Image

from vl2edge.pipeline import Pipeline, load
from vl2edge.server import create_app
from vl2edge.synthetic import write_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("VL2EDGE_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium here (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
BOX = "<|ref|>the red square<|/ref|><|det|>[[250, 250, 750, 750]]<|/det|>"


class ScriptedDecoder:
    """Answers `ids` (then eos) whatever the prompt, `delay_s` per decode step; embeds with the real model."""

    def __init__(self, backend, ids, eos: int, delay_s: float = 0.0):
        self.backend, self.ids, self.eos, self.delay_s = backend, ids, eos, delay_s
        self.config = backend.config

    def embed(self, *args):
        return self.backend.embed(*args)

    def new_cache(self, batch, max_len):
        return {"step": 0}

    def _next(self, cache):
        i = cache["step"]
        cache["step"] += 1
        out = np.full((1, self.config.language_config.vocab_size), -1e9, np.float32)
        out[0, self.ids[i] if i < len(self.ids) else self.eos] = 0.0
        return out

    def prefill(self, embeds, cache, attention_mask=None):
        return self._next(cache)

    def decode(self, token_ids, cache):
        time.sleep(self.delay_s)
        return self._next(cache)


def _serve(pipe, api_key=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe, name="demo", api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui")
    write_model("test-mha", d / "model")
    img = Image.new("RGB", (320, 240), "white")
    img.paste((220, 30, 30), (80, 60, 240, 180))
    img.save(d / "square.png")
    return d, load(d / "model", backend="torch")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _ask(page, image, prompt):
    if image is not None:
        page.set_input_files("#pick", str(image))
        page.wait_for_function("document.querySelectorAll('#drop img').length > 0")
    page.fill("#prompt", prompt)
    page.click("#send")


def test_the_page_streams_an_answer_and_keeps_the_conversation(demo, browser, tmp_path):
    d, pipe = demo
    server, app, url = _serve(pipe)
    try:
        page = browser.new_page(bypass_csp=True)  # the test's own probes are evaluated scripts
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:")) else None)
        assert "default-src 'none'" in page.goto(url).headers["content-security-policy"]
        page.wait_for_function("document.getElementById('model').textContent === 'demo'")
        # count the answer's text updates as they happen: streamed, not written once at the end
        page.evaluate("""window.updates = 0; new MutationObserver(() => window.updates++).observe(
                         document.getElementById('log'), {subtree: true, characterData: true, childList: true})""")
        _ask(page, d / "square.png", "Describe this image.")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
        first = page.inner_text(".assistant")
        assert first.strip() and page.evaluate("window.updates") > 3
        assert page.locator(".user .figure img").count() == 1
        _ask(page, None, "And the colours?")
        page.wait_for_function("document.querySelectorAll(\".assistant[data-done='1']\").length === 2", timeout=30_000)
        assert page.evaluate("messages.length") == 4 and page.evaluate("messages[1].content") == first
        shot = tmp_path / "ui-conversation.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 1000 and outside == []  # nothing fetched from outside
        assert app.state.counters["served"] == 2
    finally:
        server.should_exit = True


def test_the_page_draws_grounding_boxes_and_stop_cancels(demo, browser, tmp_path):
    d, pipe = demo
    ids = pipe.processor.encode(BOX)
    scripted = Pipeline(pipe.processor, ScriptedDecoder(pipe.backend, ids, pipe.processor.eos_id), pipe.context_length)
    server, app, url = _serve(scripted)
    try:
        page = browser.new_page(bypass_csp=True)  # the test's own probes are evaluated scripts
        page.goto(url)
        _ask(page, d / "square.png", "<|grounding|>Locate <|ref|>the red square<|/ref|> in the image.")
        page.wait_for_function("document.querySelector('.figure canvas') && "
                               "document.querySelector('.figure canvas').dataset.boxes === '1'", timeout=30_000)
        # the box is drawn where the server put it: [250, 750] of 999 -> x 80..240 of 320 px shown at scale
        drawn = page.evaluate("""() => {
            const c = document.querySelector('.figure canvas'), g = c.getContext('2d');
            const sx = c.width / 320, sy = c.height / 240;
            const at = (x, y) => g.getImageData(Math.round(x * sx), Math.round(y * sy), 1, 1).data[3];
            return {edge: at(80, 120), inside: at(160, 120), outside: at(20, 20)};
        }""")
        assert drawn["edge"] > 0 and drawn["inside"] == 0 and drawn["outside"] == 0
        shot = tmp_path / "ui-box.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 1000
    finally:
        server.should_exit = True
    slow = Pipeline(pipe.processor, ScriptedDecoder(pipe.backend, ids * 200, pipe.processor.eos_id, delay_s=0.02),
                    pipe.context_length)
    server, app, url = _serve(slow)
    try:
        page = browser.new_page(bypass_csp=True)  # the test's own probes are evaluated scripts
        page.goto(url)
        _ask(page, None, "Say it many times.")
        page.wait_for_function("document.querySelector('.assistant').textContent.length > 40", timeout=30_000)
        page.click("#stop")
        page.wait_for_selector(".assistant[data-done='stopped']", timeout=10_000)
        deadline = time.time() + 5
        while app.state.counters["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.counters["cancelled"] == 1 and app.state.counters["served"] == 0
    finally:
        server.should_exit = True


def test_dropped_and_pasted_images_and_the_api_key(demo, browser):
    """With --api-key the page's calls fail until the key is typed in; images dropped on or pasted into the page
    are sent."""
    import base64

    d, pipe = demo
    server, app, url = _serve(pipe, api_key="sekret")
    try:
        page = browser.new_page(bypass_csp=True)
        page.goto(url)
        page.fill("#prompt", "hi")
        page.click("#send")
        page.wait_for_selector(".error", timeout=30_000)
        assert "API key" in page.inner_text(".error") and app.state.counters["served"] == 0
        page.fill("#key", "sekret")
        page.dispatch_event("#key", "change")
        b64 = base64.b64encode((d / "square.png").read_bytes()).decode()
        transfer = page.evaluate_handle("""async (b64) => {
            const blob = await (await fetch('data:image/png;base64,' + b64)).blob();
            const t = new DataTransfer();
            t.items.add(new File([blob], 'square.png', {type: 'image/png'}));
            return t;
        }""", b64)
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_function("document.querySelectorAll('#drop img').length === 1")
        page.fill("#prompt", "Describe this image.")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
        assert page.locator(".user .figure img").count() == 1 and app.state.counters["served"] == 1
        assert page.evaluate("sessionStorage.getItem('vl2edge-key')") == "sekret"  # kept for the tab only
        page.evaluate("""async (b64) => {  // an image pasted into the page joins the next message
            const blob = await (await fetch('data:image/png;base64,' + b64)).blob();
            const t = new DataTransfer();
            t.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: t}));
        }""", b64)
        page.wait_for_function("document.querySelectorAll('#drop img').length === 1")
        page.fill("#prompt", "And this one?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".assistant[data-done='1']\").length === 2", timeout=30_000)
        assert page.locator(".user .figure img").count() == 2 and app.state.counters["served"] == 2
    finally:
        server.should_exit = True
