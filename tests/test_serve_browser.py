"""The web chat at `/` in a real browser: Debian's headless chromium driven by Playwright sends a
message, the streamed reply appears (rendered markdown, HTML escaped), and a screenshot is saved.
The page must work offline: every request it makes goes to the server itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaworks import LLM
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def url(smollm, smollm_tokenizer):
    engine = ContinuousEngine(LLM(smollm, smollm_tokenizer), max_batch=2, context=1024)
    with BackgroundServer(create_app(engine, "smollm2")) as base:
        yield base
    engine.shutdown()


@pytest.fixture(scope="module")
def page(url):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run `make test` (it installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = browser.new_page()
        requested: list[str] = []
        pg.on("request", lambda r: requested.append(r.url))
        pg.requested = requested
        yield pg
        browser.close()


def _ask(page, url: str, question: str, max_tokens: int) -> None:
    """Open the page, ask one greedy question, wait for the whole reply."""
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#input", question)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)


def test_web_chat_streams_a_reply_and_saves_a_screenshot(page, url, tmp_path):
    _ask(page, url, "What is the capital of France?", 24)
    reply = page.locator(".msg.assistant .body").last
    text = reply.inner_text()
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 1000
    assert text.strip() and "Error" not in text
    assert "Paris" in text
    assert all(u.startswith(url) for u in page.requested), "the page fetched something remote"


def test_markdown_renders_code_blocks_and_escapes_html(page, url):
    page.goto(url + "/")
    html = page.evaluate("renderMarkdown('**hi** <b>x</b>\\n```py\\nprint(1 < 2)\\n```')")
    assert "<strong>hi</strong>" in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert '<pre><code data-lang="py">print(1 &lt; 2)</code></pre>' in html
    call = {"function": {"name": "calculator", "arguments": '{"expression": "2*(3+4)^2"}'}}
    assert page.evaluate("(c) => runTool(c)", call) == {"result": 98}


def test_stop_button_aborts_a_running_reply(page, url):
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    page.fill("#max_tokens", "800")
    page.fill("#input", "Write a very long story about a dragon.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .body') && "
                           "document.querySelector('.msg.assistant .body').textContent.length > 5")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=30_000)
    assert page.locator(".msg.assistant .body").last.inner_text().endswith("[stopped]")
    assert page.is_enabled("#send")


def test_tool_call_and_result_are_shown_inline_then_answered(page, url):
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.check("#use_tools")
    page.select_option("#tool_choice", "calculator")
    page.fill("#input", "What is 23*19?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length >= 1 "
                           "&& document.getElementById('send').disabled === false",
                           timeout=120_000)
    tools = page.locator(".msg.tool .body").all_inner_texts()
    assert tools[0].startswith("call calculator") and '"expression"' in tools[0]
    assert tools[1] == 'result {"result":437}'
    assert page.locator(".msg.assistant .body").last.inner_text().strip()  # the final answer


THINK = (r'start: "<think>" /[a-z]{3,8}( [a-z]{2,8}){2,5}/ "</think>" '
         r'/[A-Z][a-z]{2,8}( [a-z]{2,8}){1,4}\./')


@pytest.fixture(scope="module")
def thinking_url(smollm, smollm_tokenizer):
    engine = ContinuousEngine(LLM(smollm, smollm_tokenizer), max_batch=2, context=1024)
    app = create_app(engine, "smollm2", reasoning_format="deepseek")
    with BackgroundServer(app) as base:
        yield base
    engine.shutdown()


def test_reasoning_is_shown_collapsed_above_the_answer(page, thinking_url):
    """The page's own request, with a grammar added on its way out so the real model's reply
    opens with a think block: the reasoning sits in a closed <details>, the answer below."""
    import json
    import re

    def with_grammar(route) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "guided_grammar": THINK}))

    page.route("**/v1/chat/completions", with_grammar)
    try:
        _ask(page, thinking_url, "Is the sky blue?", 60)
        thought = page.locator(".msg.assistant details.thinking").last
        assert thought.get_attribute("open") is None  # collapsed
        assert re.fullmatch(r"[a-z]+( [a-z]+)+", thought.locator("div").text_content().strip())
        answer = page.locator(".msg.assistant .body").last.inner_text().strip()
        assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+)+\.", answer), answer
    finally:
        page.unroute("**/v1/chat/completions")
