"""The chat page at `/` in a real browser: Debian's Chromium, driven by
Playwright, against the session's `ferry serve` (which has an API key).

- Over HTTP/3 (QUIC forced to the TLS port; the self-signed certificate
  trusted by its SPKI pin, which also covers QUIC) and over HTTP/2 (TLS, QUIC
  off): a message sent with Enter streams the API's greedy text for the same
  request, and the page names the protocol the browser used.
- Stop aborts a long reply mid-stream and the engine frees the request.
- Model text with `<script>`, `<img onerror>` and markdown shows as text, with
  bold and code as elements (a canned SSE reply through `page.route`).
- With no key in the tab, the page loads, asks for one on the first send,
  streams after it is given, and keeps it in sessionStorage.
- `--no-webui` leaves `/` a 404; the page's headers (CSP and the rest).
- Screenshots at phone and desktop widths go to $FERRY_E2E_ARTIFACTS
  (default tests/e2e/artifacts/, gitignored).

Skipped, saying why, only when no Chromium binary is found (CI installs
Debian's `chromium`, so there it runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from e2e_server import REPO, start_server, stop_server
from e2e_util import need, prom_value, wait_until

pytestmark = pytest.mark.timeout(120)

KEY_STORE = "ferry.apiKey"  # the page's sessionStorage name (app.js)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ARTIFACTS = Path(os.environ.get("FERRY_E2E_ARTIFACTS", REPO / "tests" / "e2e" / "artifacts"))
REPLY_TIMEOUT_MS = 60_000
# The page's CSP forbids eval, so waits are given functions (Playwright runs
# a bare expression through eval in the page).


def chromium_binary() -> str | None:
    for name in (os.environ.get("FERRY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def playwright():
    exe = chromium_binary()
    if exe is None:
        pytest.skip("no Chromium binary found (apt-get install chromium, or set FERRY_CHROMIUM)")
    sync_api = need("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        yield p, exe


def launch(playwright, server, quic: bool):
    p, exe = playwright
    # The pin makes Chromium accept the self-signed certificate over TCP and
    # over QUIC (--ignore-certificate-errors does not reach QUIC).
    args = [f"--ignore-certificate-errors-spki-list={server.spki_pin}"]
    if quic:
        args.append(f"--origin-to-force-quic-on=127.0.0.1:{server.tls_port}")
    else:
        # Otherwise the server's Alt-Svc would move the browser to h3.
        args.append("--disable-quic")
    return p.chromium.launch(executable_path=exe, args=args)


@pytest.fixture(scope="module")
def h3_browser(playwright, server):
    assert server.spki_pin, "the server printed no SPKI pin"
    b = launch(playwright, server, quic=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def h2_browser(playwright, server):
    b = launch(playwright, server, quic=False)
    yield b
    b.close()


def open_page(browser, server, key: bool = True, viewport=(1280, 800)):
    """A fresh tab on the chat page; with `key`, the API key already in its sessionStorage."""
    ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    if key:
        ctx.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_STORE)}, {json.dumps(server.api_key)})")
    page = ctx.new_page()
    resp = page.goto(server.https_url + "/")
    assert resp is not None and resp.status == 200, resp and resp.status
    return page


def set_settings(page, temperature="0", max_tokens="24", seed="", system=""):
    page.click("#settings-toggle")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#seed", seed)
    page.fill("#system", system)
    page.click("#settings-toggle")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply(page):
    """The last reply once its figures are shown (the stream has ended)."""
    page.wait_for_selector(".msg.assistant:last-child .stats [data-stat=protocol]", timeout=REPLY_TIMEOUT_MS)
    return page.locator(".msg.assistant").last


def stat(bubble, name: str) -> str:
    return bubble.locator(f"[data-stat={name}]").inner_text()


def greedy(http, server, messages, max_tokens: int) -> tuple[str, dict]:
    """The API's answer (text, usage) to what the page sends with temperature 0."""
    body = {"model": server.model_id, "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": max_tokens}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]


def running(http) -> float:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    return prom_value(r.text, "vllm:num_requests_running")


# ------------------------------------------------------------------ a conversation over h3 and h2


@pytest.mark.parametrize("protocol", ["h3", "h2"])
def test_reply_streams_the_greedy_text(request, http, server, protocol):
    browser = request.getfixturevalue(f"{protocol}_browser")
    page = open_page(browser, server)
    page.wait_for_function("() => document.getElementById('model').dataset.maxModelLen", timeout=10_000)
    header = page.inner_text("#model")
    assert server.model_id in header and str(server.max_model_len) in header, header
    set_settings(page, temperature="0", max_tokens="24")
    question = "What is the capital of France?"
    send(page, question)
    bubble = wait_reply(page)
    want, used = greedy(http, server, [{"role": "user", "content": question}], 24)
    assert bubble.get_attribute("data-raw") == want
    assert stat(bubble, "protocol") == protocol
    assert re.fullmatch(r"first token \d+ ms", stat(bubble, "ttft")), stat(bubble, "ttft")
    assert re.fullmatch(r"\d+\.\d tokens/s", stat(bubble, "rate")), stat(bubble, "rate")
    prompt, completion = used["prompt_tokens"], used["completion_tokens"]
    assert stat(bubble, "usage") == f"{prompt} + {completion} = {prompt + completion} tokens"
    # A second turn carries the first: the page sends the whole conversation.
    follow = "And of Germany?"
    send(page, follow)
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .stats [data-stat=protocol]').length == 2",
                           timeout=REPLY_TIMEOUT_MS)
    second = page.locator(".msg.assistant").last
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": want},
               {"role": "user", "content": follow}]
    assert second.get_attribute("data-raw") == greedy(http, server, history, 24)[0]
    # New chat starts over.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.context.close()


# ------------------------------------------------------------------ stop


def test_stop_aborts_the_request(h3_browser, http, server):
    assert wait_until(lambda: running(http) == 0, 30), "the engine was busy before the test"
    page = open_page(h3_browser, server)
    set_settings(page, temperature="0", max_tokens=str(server.max_model_len // 2))

    # The page sends what the user set; ignore_eos (no field for it) makes
    # the reply surely long, so Stop lands mid-stream.
    def long_reply(route):
        body = json.loads(route.request.post_data)
        body["ignore_eos"] = True
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", long_reply)
    send(page, "Write a very long story.")
    page.wait_for_function("() => (document.querySelector('.msg.assistant')?.dataset.raw || '').length > 20",
                           timeout=REPLY_TIMEOUT_MS)
    assert running(http) >= 1, "the reply is streaming, yet no request runs"
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    t0 = time.monotonic()
    assert wait_until(lambda: running(http) == 0, 5), "the engine still runs the request 5 s after Stop"
    freed_after = time.monotonic() - t0
    bubble = wait_reply(page)
    assert bubble.get_attribute("data-finish") == "stopped"
    partial = bubble.get_attribute("data-raw")
    assert 20 < len(partial), partial
    assert page.is_visible("#send") and not page.is_visible("#stop")
    # Far sooner than the rest of the reply would take.
    assert freed_after < 5
    # New chat during a reply stops it too, and nothing of it comes back.
    send(page, "Write another very long story.")
    page.wait_for_function("() => (document.querySelector('.msg.assistant:last-child')?.dataset.raw || '').length > 20",
                           timeout=REPLY_TIMEOUT_MS)
    page.click("#new-chat")
    assert wait_until(lambda: running(http) == 0, 5), "the engine still runs the request 5 s after New chat"
    time.sleep(0.5)
    assert page.locator(".msg").count() == 0
    assert page.is_visible("#send")
    page.context.close()


# ------------------------------------------------------------------ the renderer: model text stays text


HOSTILE = ("Hello <script>window.pwned=1</script> and <img src=x onerror=\"window.pwned=2\">.\n\n"
           "This is **bold** and *italic* and `inline <b>code</b>`.\n\n"
           "```js\nconsole.log('<script>alert(1)</script>')\n```\n\n"
           "- [safe](https://example.com/a)\n- [unsafe](javascript:window.pwned=3)\n\n"
           "## A heading")


def canned_stream(text: str) -> str:
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    chunk = lambda delta, finish=None: {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
    events.append(chunk({}, "stop"))
    events.append({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_markup_from_the_model_is_shown_as_text(h2_browser, server):
    page = open_page(h2_browser, server)
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                                           body=canned_stream(HOSTILE)))
    send(page, "say something nasty")
    bubble = wait_reply(page)
    assert bubble.get_attribute("data-raw") == HOSTILE
    body = bubble.locator(".body")
    assert page.evaluate("window.pwned") is None, "model text ran as script"
    assert body.locator("script, img, iframe, b").count() == 0, body.inner_html()
    text = body.inner_text()
    assert "<script>window.pwned=1</script>" in text
    assert '<img src=x onerror="window.pwned=2">' in text
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("em").inner_text() == "italic"
    assert body.locator("p code").inner_text() == "inline <b>code</b>"
    assert body.locator("pre code").inner_text() == "console.log('<script>alert(1)</script>')"
    assert body.locator("pre code").get_attribute("data-lang") == "js"
    assert body.locator("h2").inner_text() == "A heading"
    links = body.locator("a")
    assert links.count() == 1, "only the http(s) link is a link"
    assert links.get_attribute("href") == "https://example.com/a"
    assert set(links.get_attribute("rel").split()) >= {"noopener"}
    assert "[unsafe](javascript:window.pwned=3)" in body.locator("li").nth(1).inner_text()
    page.context.close()


# ------------------------------------------------------------------ the API key


def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab(h2_browser, http, server):
    page = open_page(h2_browser, server, key=False)  # the page itself needs no key
    page.wait_for_selector("#key-form", state="visible", timeout=10_000)  # /v1/models said 401
    set_settings(page, temperature="0", max_tokens="8")
    send(page, "Hi")
    page.wait_for_selector("#key-form", state="visible")
    assert page.locator(".msg").count() == 0, "a refused message is held back, not shown as a reply"
    page.fill("#api-key", server.api_key)
    page.click("#key-save")  # the held message goes out with the key
    bubble = wait_reply(page)
    assert bubble.get_attribute("data-raw") == greedy(http, server, [{"role": "user", "content": "Hi"}], 8)[0]
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORE)})") == server.api_key
    assert page.evaluate(f"localStorage.getItem({json.dumps(KEY_STORE)})") is None
    assert not page.is_visible("#key-form")
    page.context.close()


# ------------------------------------------------------------------ headers, --no-webui


def test_page_headers_and_open_paths(server):
    httpx = need("httpx")
    with httpx.Client(base_url=server.http_url, timeout=10) as c:  # no key
        r = c.get("/")
        assert r.status_code == 200
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        etag = r.headers["etag"]
        assert c.get("/", headers={"if-none-match": etag}).status_code == 304
        for path, ty in [("/webui/app.js", "text/javascript"), ("/webui/markdown.js", "text/javascript"),
                         ("/webui/app.css", "text/css")]:
            a = c.get(path)
            assert a.status_code == 200 and a.headers["content-type"].startswith(ty), (path, a.status_code)
            assert a.headers["x-content-type-options"] == "nosniff"
        # The API behind the page still wants the key.
        assert c.get("/v1/models").status_code == 401
        assert c.get("/webui/other.js").status_code == 401


def test_no_webui_flag_gives_404():
    srv = start_server(["--no-webui"], max_num_seqs=2)
    try:
        httpx = need("httpx")
        r = httpx.get(srv.http_url + "/", headers=srv.auth, timeout=10)
        assert r.status_code == 404, r.text
        assert "content-security-policy" not in r.headers
        assert httpx.get(srv.http_url + "/webui/app.js", headers=srv.auth, timeout=10).status_code == 404
    finally:
        stop_server(srv)


# ------------------------------------------------------------------ phone and desktop


def test_screenshots_phone_and_desktop(h2_browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = open_page(h2_browser, server, viewport=(390, 844))
    set_settings(page, temperature="0", max_tokens="40")
    send(page, "Give me a short list of three fruits.")
    wait_reply(page)
    shots = {}
    for name, (w, h) in {"phone": (390, 844), "desktop": (1280, 800)}.items():
        page.set_viewport_size({"width": w, "height": h})
        # Nothing wider than the screen: no sideways scrolling on a phone.
        assert page.evaluate("document.documentElement.scrollWidth") <= w
        path = ARTIFACTS / f"webui-{name}.png"
        page.screenshot(path=str(path))
        shots[name] = path
    for path in shots.values():
        assert path.is_file() and path.stat().st_size > 0, path
    page.context.close()
