"""The web chat's voice in a real browser: Debian's headless chromium hears a question spoken by our
TTS through its fake microphone (`--use-file-for-fake-audio-capture`), the page records it with
MediaRecorder, the server's Whisper transcribes what Chromium encoded (WebM/Opus), the text is
sent as the user's turn, SmolLM2 answers, and with "Speak replies" on the answer is fetched from
/v1/audio/speech (the server records what it was asked to say) and played through Web Audio (the
page's AudioContext clock passes the end of the scheduled audio). Errors (no microphone
permission, a failed transcription) show in the status line and leave the chat usable."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Any

import pytest

from llamaworks import LLM
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer
from llamaworks.voice import tts
from llamaworks.voice.asr import normalize_words, word_error_rate

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KEY = "voice-key"
QUESTION = "What is the capital of France?"
LEAD_S, TAIL_S = 0.3, 4.0  # silence around the question in the fake microphone's file


class SpeechLog:
    """ASGI wrapper keeping the JSON body of every /v1/audio/speech request the server gets."""

    def __init__(self, app: Any) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/audio/speech":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, recording, send)


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> tuple[Path, float]:
    """The question spoken by our default voice, with silence before and after (the fake
    microphone plays it once from when the page opens it)."""
    folder = tmp_path_factory.mktemp("voice")
    spoken = folder / "spoken.wav"
    tts.speak_to_wav(QUESTION, spoken)
    with wave.open(str(spoken)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    padded = folder / "question.wav"
    rate = params.framerate
    with wave.open(str(padded), "wb") as w:
        w.setparams(params)
        w.writeframes(bytes(2 * int(LEAD_S * rate)) + frames + bytes(2 * int(TAIL_S * rate)))
    return padded, LEAD_S + len(frames) / (2 * rate)


@pytest.fixture(scope="module")
def server(smollm, smollm_tokenizer):
    engine = ContinuousEngine(LLM(smollm, smollm_tokenizer), max_batch=2, context=1024)
    app = create_app(engine, "smollm2", api_key=KEY)
    log = SpeechLog(app)
    with BackgroundServer(log) as base:
        yield base, log
    app.state.speech_engines.close()
    engine.shutdown()


def _launch(p: Any, args: list[str]) -> Any:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run `make test` (it installs Debian's chromium)")
    return p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS + args)


@pytest.fixture(scope="module")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def microphone_browser(playwright, question_wav):
    """Chromium whose microphone is granted without asking and plays the question file."""
    browser = _launch(playwright, ["--use-fake-ui-for-media-stream",
                                   "--use-fake-device-for-media-stream",
                                   f"--use-file-for-fake-audio-capture={question_wav[0]}%noloop"])
    yield browser
    browser.close()


def _open(browser: Any, url: str, key: str = KEY) -> Any:
    """A fresh page (its own context, so its own localStorage) with the API key entered. Pages an
    earlier test left open (it failed before closing them) are closed first, so their speech
    requests do not reach this test's log."""
    for ctx in browser.contexts:
        ctx.close()
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.requested = requested
    page.goto(url + "/")
    page.fill("#api_key", key)
    page.dispatch_event("#api_key", "change")
    if key == KEY:
        page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    page.fill("#temperature", "0")
    return page


def _record(page: Any, seconds: float) -> None:
    """Press the microphone button, let the fake microphone play `seconds`, press it again."""
    page.click("#mic")
    page.wait_for_selector("#mic[aria-pressed=true]")
    assert page.get_attribute("#mic", "aria-label") == "Stop recording and send"
    page.wait_for_timeout(seconds * 1000)
    page.click("#mic")


def test_spoken_question_is_sent_as_the_user_turn_answered_and_read_aloud(
        microphone_browser, server, question_wav):
    url, log = server
    page = _open(microphone_browser, url)
    page.fill("#max_tokens", "40")
    page.check("#speak_replies")
    transcriptions: list[int] = []
    page.on("response", lambda r: transcriptions.append(r.status)
            if r.url.endswith("/v1/audio/transcriptions") else None)
    log.bodies.clear()
    _record(page, question_wav[1] + 1.0)

    user = page.wait_for_selector(".msg.user[data-voice] .body", timeout=120_000)
    heard = user.inner_text()
    assert transcriptions == [200]
    # Chromium's fake microphone and its Opus encoding reach Whisper slightly differently per run:
    # once in a fresh CI run "France" was heard as "friends", so one word of the six may differ
    wer = word_error_rate(QUESTION, heard)
    assert wer <= 0.2, heard
    page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
    reply = page.locator(".msg.assistant .body").last.inner_text()
    if wer == 0.0:  # the model answers the question it was given
        assert "Paris" in reply, reply

    page.wait_for_selector(".msg.assistant[data-speech=done]", timeout=120_000)
    said = " ".join(b["input"] for b in log.bodies)
    assert normalize_words(said) == normalize_words(reply), (said, reply)
    assert all(b["response_format"] == "pcm" and b["model"] == "tts-1" for b in log.bodies)
    msg = page.locator(".msg.assistant").last
    start = float(msg.get_attribute("data-speech-start"))
    seconds = float(msg.get_attribute("data-speech-seconds"))
    assert seconds > 0.5  # a sentence of speech at 24 kHz, not a click
    assert page.evaluate("voice.ctx.currentTime") >= start + seconds  # the clock played it all
    assert page.get_attribute("#mic", "aria-pressed") == "false" and page.is_enabled("#mic")
    assert page.inner_text("#voice_status") == ""
    print("voice timeline (ms from the reply's start):", page.evaluate("voice.log"))
    assert all(u.startswith(url) for u in page.requested), "the page fetched something remote"
    page.close()


def _ask_aloud(page: Any, question: str, max_tokens: int) -> None:
    page.fill("#max_tokens", str(max_tokens))
    page.check("#speak_replies")
    page.fill("#input", question)
    page.click("#send")


def test_a_long_reply_is_spoken_sentence_by_sentence_while_it_streams(microphone_browser,
                                                                      server):
    url, log = server
    page = _open(microphone_browser, url)
    log.bodies.clear()
    _ask_aloud(page, "Tell me three facts about Paris.", 60)
    page.wait_for_selector(".msg.assistant[data-speech=done]", timeout=180_000)
    reply = page.locator(".msg.assistant .body").last.inner_text()
    timeline = page.evaluate("voice.log")
    print("voice timeline (ms from the reply's start):", timeline)
    events = [e["event"] for e in timeline]
    assert events.index("request") < events.index("reply-done")  # spoken while still written
    assert len(log.bodies) >= 2
    said = " ".join(b["input"] for b in log.bodies)
    assert normalize_words(said) == normalize_words(reply), (said, reply)
    assert page.is_disabled("#stop")
    page.close()


def test_stop_silences_a_reply_being_spoken(microphone_browser, server):
    url, _ = server
    page = _open(microphone_browser, url)
    _ask_aloud(page, "Tell me three facts about Paris.", 60)
    page.wait_for_selector(".msg.assistant[data-speech=playing]", timeout=180_000)
    page.click("#stop")  # enabled while the reply is written or spoken
    page.wait_for_selector(".msg.assistant[data-speech=stopped]")
    page.wait_for_function("document.getElementById('stop').disabled")
    assert page.evaluate("voice.speakers.size") == 0
    assert page.is_enabled("#send") and page.is_enabled("#mic")
    page.close()


def test_denied_microphone_shows_an_error_and_typing_still_works(playwright, server):
    """Headless chromium without the fake permission UI denies the microphone."""
    url, _ = server
    browser = _launch(playwright, ["--use-fake-device-for-media-stream"])
    try:
        page = _open(browser, url)
        page.click("#mic")
        page.wait_for_selector("#voice_status.error")
        assert page.inner_text("#voice_status").startswith("Microphone permission was denied")
        assert page.get_attribute("#mic", "aria-pressed") == "false"
        assert page.locator(".msg").count() == 0
        page.fill("#max_tokens", "8")
        page.fill("#input", "Say hello.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
        assert page.locator(".msg.assistant .body").last.inner_text().strip()
        assert "error" not in (page.locator(".msg.assistant").last.get_attribute("class") or "")
    finally:
        browser.close()


def test_failed_transcription_is_reported_and_nothing_is_sent(microphone_browser, server,
                                                               question_wav):
    """A wrong API key: the server refuses the upload (401) and the page says why."""
    url, _ = server
    page = _open(microphone_browser, url, key="wrong")
    _record(page, 1.0)
    page.wait_for_selector("#voice_status.error", timeout=60_000)
    status = page.inner_text("#voice_status")
    assert status.startswith("Transcription failed:") and "API key" in status, status
    assert page.locator(".msg").count() == 0
    assert page.is_enabled("#mic") and page.is_enabled("#send")
    page.close()


def test_speakable_text_drops_code_blocks_and_markup(microphone_browser, server):
    url, _ = server
    page = _open(microphone_browser, url)
    said = page.evaluate("speakable('# Plan\\n**Use** `ls` and [the docs](http://x.y).\\n"
                         "```sh\\nrm -rf /tmp/x\\n```\\n- Then *rest*.')")
    assert said.split() == ["Plan", "Use", "ls", "and", "the", "docs.", "Then", "rest."]
    page.close()
