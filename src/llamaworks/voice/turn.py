"""Voice turns: the user's audio -> transcript -> a chat reply generated as a stream -> each
sentence spoken the moment it is complete; the first audio exists as soon as the first sentence of
the reply does.

    from llamaworks.voice.turn import VoiceChat

    with VoiceChat() as chat:                 # SmolLM2, piper's voice; tools="calculator" too
        for event in chat.turn("question.wav"):
            if event.kind == "text":
                print(event.text, end="", flush=True)
            elif event.kind == "audio":       # one sentence: 16-bit mono PCM
                play(event.speech.pcm, event.speech.sample_rate)

`VoiceChat.turn(audio)` yields `TurnEvent`s in the order things happen: "transcript" (what was
heard), then while the reply is generated "text" (answer deltas), "reasoning" (a thinking model's
block, not spoken), "tool" (an agent step, with tools), "audio" (a sentence's speech, yielded as
soon as it is synthesized) and last "done" (the whole reply). `voice_chat(audio, ...)` is one turn
in a fresh `VoiceChat`. Under them, `voice_turn` and `speak_reply` take any stream of reply deltas,
which is how `llamaworks chat --voice-in` drives its own engine and agent loop.

The reply comes from the engine's own streaming generation (`cli.chat_reply_stream`, the function
`llamaworks chat` prints from, on the engine of an `LLM`; with tools `tools.agent.run_agent`'s
delta events); nothing here decodes tokens. A sentence is synthesized as soon as its last delta
arrives, before the next delta is asked for: generation waits meanwhile (on a small CPU the model
and the voice would share the cores; what matters first is the first sentence's audio, and after
that each sentence plays for longer than the next takes to write and speak). What is spoken is the
text printed: the answer's deltas (with tools, every step's text outside tool calls, which with
the shipped tool adapter is the final answer), Markdown markers left unread (`tts.speakable`).
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError
from llamaworks.voice import asr, tts

# The Whisper model a voice turn hears with: tiny.en. Measured on a 1.7 s spoken question, int8,
# 2 threads (BENCHMARKS.md, issue 18 voice turns): tiny.en 0.6-0.8 s, base 1.4-1.6 s with the
# language given and 2.9 s detecting it; both wrote the question exactly. The turn's goal (2 s to
# the first spoken byte) leaves no room for base, and the default chat model and voice are English.
TURN_ASR_MODEL = "tiny.en"

# A reply stream yields str (answer text) or (kind, payload): ("text", str), ("reasoning", str),
# ("tool", step dict); its return value (if any) is the "done" event's `data`.
Delta = str | tuple[str, Any]


@dataclass
class TurnEvent:
    """One thing that happened in a voice turn, `at` seconds after it began (the end of the
    user's audio). kind: "transcript" (text: what was heard, data: the `asr.Transcript`), "text"
    / "reasoning" (a delta of the reply), "tool" (data: {"tool", "arguments", "result"}), "audio"
    (text: the sentence, speech: its `tts.Speech`), "done" (text: the reply as printed and
    spoken, data: the reply stream's result, e.g. the agent's `AgentResult`)."""

    kind: str
    at: float
    text: str = ""
    speech: tts.Speech | None = None
    data: Any = None


class SentenceStream:
    """Text arriving in pieces -> complete sentences as soon as each ends (its terminator and the
    blank after it have arrived): the same sentences `tts.split_sentences` cuts from the whole
    text, however it was chunked."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, delta: str) -> list[str]:
        self.buf += delta
        *done, self.buf = tts._SENTENCE.split(self.buf)
        return [s for s in (" ".join(p.split()) for p in done) if re.search(r"\w", s)]

    def flush(self) -> list[str]:
        rest, self.buf = self.buf, ""
        return tts.split_sentences(rest)


def hear(audio: str | os.PathLike[str] | Any, model: str = TURN_ASR_MODEL,
         language: str | None = None, threads: int = 0, name: str | None = None
         ) -> asr.Transcript:
    """The transcript of the user's audio (a file or 16 kHz float32 samples); English for an
    English-only model; a clear error for audio without speech (`name`: the audio's name in
    it)."""
    if language is None and model.endswith(".en"):
        language = "en"
    t = asr.transcribe(audio, model, language=language, threads=threads, progress=False)
    if not re.search(r"\w", t.text):
        where = name or (f"{audio}" if isinstance(audio, (str, os.PathLike)) else "the audio")
        raise LlamaworksError(f"{where}: no speech heard in {t.duration:.1f} s of audio")
    return t


def speak_reply(deltas: Iterable[Delta], engine: Any, start: float | None = None
                ) -> Iterator[TurnEvent]:
    """Events for a reply as it streams: each delta as it comes, each complete sentence's audio
    from `engine` (a `tts.open_engine`; None: no audio) right after the delta that completed it,
    then "done"."""
    t0 = time.perf_counter() if start is None else start
    split = SentenceStream()
    parts: list[str] = []

    def now() -> float:
        return time.perf_counter() - t0

    def say(sentences: list[str]) -> Iterator[TurnEvent]:
        for s in sentences if engine is not None else ():
            pcm, rate = engine.synth(s)
            yield TurnEvent("audio", now(), s, tts.Speech(s, pcm, rate))

    it = iter(deltas)
    result = None
    while True:
        try:
            item = next(it)
        except StopIteration as stop:
            result = stop.value
            break
        kind, payload = ("text", item) if isinstance(item, str) else item
        if kind == "tool":
            yield TurnEvent("tool", now(), data=payload)
            continue
        if not payload:
            continue
        yield TurnEvent(kind, now(), payload)
        if kind == "text":
            parts.append(payload)
            yield from say(split.feed(payload))
    yield from say(split.flush())
    yield TurnEvent("done", now(), "".join(parts).strip(), data=result)


def voice_turn(audio: str | os.PathLike[str] | Any, reply: Callable[[str], Iterable[Delta]],
               engine: Any, asr_model: str = TURN_ASR_MODEL, language: str | None = None,
               threads: int = 0) -> Iterator[TurnEvent]:
    """One turn: hear `audio`, yield the transcript, then `speak_reply(reply(transcript))`.
    Times run from the call (for a live microphone, the end of the user's speech)."""
    t0 = time.perf_counter()
    heard = hear(audio, asr_model, language, threads)
    yield TurnEvent("transcript", time.perf_counter() - t0, heard.text, data=heard)
    yield from speak_reply(reply(heard.text), engine, t0)


class _Cancelled(Exception):
    pass


def pull(run: Callable[[Callable[[Any], None]], Any]) -> Generator[Any, None, Any]:
    """A push producer as a generator: `run(emit)` runs in a thread, each `emit(x)` is yielded
    here (the producer waits while its item is handled: at most one item ahead), and `run`'s
    return value is the generator's. Closing the generator early (or an exception in the
    consumer) makes the producer's next `emit` raise, so it stops at its next item."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def emit(x: Any) -> None:
        if stop.is_set():
            raise _Cancelled
        q.put(("item", x))

    def target() -> None:
        try:
            q.put(("done", run(emit)))
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the consumer
            if not stop.is_set():
                q.put(("error", e))

    worker = threading.Thread(target=target, name="llamaworks-voice-reply", daemon=True)
    worker.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "item":
                yield x
            elif kind == "done":
                return x
            else:
                raise x
    finally:
        stop.set()
        while worker.is_alive():  # let a producer blocked on put() see the stop
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


def chat_deltas(stream: Generator[tuple[str, str], None, str]) -> Generator[Delta, None, str]:
    """The reply stream of `cli.chat_reply_stream`'s (reasoning, answer) pairs; returns the
    answer."""
    while True:
        try:
            reasoning, answer = next(stream)
        except StopIteration as stop:
            return stop.value
        if reasoning:
            yield ("reasoning", reasoning)
        if answer:
            yield answer


def agent_deltas(run: Callable[[Callable[[dict], None]], Any]) -> Generator[Delta, None, Any]:
    """The reply stream of an agent loop: `run(on_event)` calls `tools.agent.run_agent` with
    `on_event`; its "delta" events are the answer text, its "tool" events the steps; returns
    the `AgentResult`."""
    events = pull(run)
    while True:
        try:
            e = next(events)
        except StopIteration as stop:
            return stop.value
        if e["type"] == "delta":
            yield e["text"]
        elif e["type"] == "tool":
            yield ("tool", {k: e[k] for k in ("tool", "arguments", "result")})


@dataclass
class VoiceChat:
    """A spoken conversation with a model. llm: an `LLM`, a model path or name, or None for the
    default (SmolLM2; with `tools` and no model, the shipped tool adapter merged as `chat --tools`
    does). tools: tool names ("calculator,python") or a `ToolRegistry` (then each turn is the
    agent loop). params: `SamplingParams` (default: `llamaworks chat`'s, 256 new tokens). voice,
    speed, variation: as `speak` (the engine process is started, and piper warmed, at once).
    asr_model, language: what hears the audio (default tiny.en, English; loaded at once).
    threads: decode threads (None: the free cores before each reply) and Whisper's (None: all
    cores)."""

    llm: Any = None
    system: str | None = None
    tools: Any = None
    params: Any = None
    max_steps: int = 5
    voice: str | None = None
    speed: float = 1.0
    variation: float = 1.0
    asr_model: str = TURN_ASR_MODEL
    language: str | None = None
    threads: int | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        from llamaworks.infer.llm import LLM

        self.registry = None
        if self.tools is not None:
            from llamaworks.tools.registry import ToolRegistry, default_registry

            self.registry = (self.tools if isinstance(self.tools, ToolRegistry)
                             else default_registry(self.tools))
        self.engine = tts.open_engine(self.voice, self.speed, warm=True, variation=self.variation)
        try:
            if not isinstance(self.llm, LLM):
                self.llm = self._load(self.llm)
            if self.params is None:
                self.params = self._default_params()
            asr.load_whisper(self.asr_model, self.threads or 0, "int8")  # now, not in a turn
        except BaseException:
            self.engine.close()
            raise
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def _load(self, name: str | Path | None) -> Any:
        from llamaworks.checkpoint import load_tokenizer
        from llamaworks.checkpoint.discovery import model_path
        from llamaworks.infer.llm import LLM
        from llamaworks.infer.load import load_for_use
        from llamaworks.tools.chat import DEFAULT_TOOL_ADAPTER

        path = model_path(name)
        adapters = ((str(DEFAULT_TOOL_ADAPTER),) if self.registry is not None and name is None
                    and DEFAULT_TOOL_ADAPTER.is_dir() else ())
        return LLM(load_for_use(path, adapters), tokenizer=load_tokenizer(path))

    def _default_params(self) -> Any:
        from llamaworks.cli import CHAT_DEFAULTS
        from llamaworks.infer.sampling import SamplingParams

        if self.registry is not None:  # as `chat --tools`
            return SamplingParams(temperature=CHAT_DEFAULTS["temperature"],
                                  top_p=CHAT_DEFAULTS["top_p"], max_tokens=256)
        return SamplingParams(**CHAT_DEFAULTS, max_tokens=256)

    def reply(self, text: str) -> Generator[Delta, None, Any]:
        """The reply to `text` as a stream (the conversation is kept: `messages`)."""
        if self.registry is not None:
            return self._agent_reply(text)
        return self._chat_reply(text)

    def _chat_reply(self, text: str) -> Generator[Delta, None, str]:
        from llamaworks.cli import chat_reply_stream

        self.messages.append({"role": "user", "content": text})
        stream = chat_reply_stream(self.llm.engine, self.llm.tokenizer, self.messages,
                                   self.params.max_tokens, self.params, self.threads)
        answer = ""
        try:
            answer = yield from chat_deltas(stream)
        finally:
            self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _agent_reply(self, text: str) -> Generator[Delta, None, Any]:
        from llamaworks.infer.threads import use_threads
        from llamaworks.tools.agent import run_agent

        convo = [*self.messages, {"role": "user", "content": text}]

        def run(on_event: Callable[[dict], None]) -> Any:
            use_threads(self.threads)
            return run_agent(self.llm, convo, self.registry, max_steps=self.max_steps,
                             params=self.params, on_event=on_event)

        res = yield from agent_deltas(run)
        self.messages[:] = res.messages
        return res

    def turn(self, audio: str | os.PathLike[str] | Any) -> Iterator[TurnEvent]:
        """One spoken turn (see the module docstring for the events)."""
        return voice_turn(audio, self.reply, self.engine, self.asr_model, self.language,
                          self.threads or 0)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> VoiceChat:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def voice_chat(audio: str | os.PathLike[str] | Any, llm: Any = None, **kw: Any
               ) -> Iterator[TurnEvent]:
    """One voice turn in a fresh `VoiceChat(llm, **kw)` (closed when the events end)."""
    with VoiceChat(llm, **kw) as chat:
        yield from chat.turn(audio)
