"""Speech to text: faster-whisper (CTranslate2, int8 on CPU) over audio decoded by PyAV, long
files cut by its voice-activity filter (silero VAD), segments with timestamps, and the output
formats of OpenAI's transcription endpoint (text, json, verbose_json, srt, vtt)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaworks.errors import LlamaworksError
from llamaworks.voice.models import whisper_model_dir

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16_000
DEFAULT_MODEL = "base"
FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
PROGRESS_MIN_S = 60.0  # a progress bar on files at least this long


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    tokens: list[int] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment]
    model: str


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode any format PyAV (ffmpeg) reads to 16 kHz mono float32; a clear error for a missing
    file, a file that is not audio, or one that holds no samples."""
    from faster_whisper.audio import decode_audio

    p = Path(path)
    if not p.is_file():
        raise LlamaworksError(f"{p}: {'not a file' if p.exists() else 'no such file'}")
    try:
        audio = decode_audio(str(p), sampling_rate=SAMPLE_RATE)
    except Exception as e:  # av.error.* (InvalidDataError, ...), IndexError for no audio stream
        raise LlamaworksError(f"{p}: not a readable audio file ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise LlamaworksError(f"{p}: the file holds no audio samples")
    return audio


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


@lru_cache(maxsize=4)
def load_whisper(name: str = DEFAULT_MODEL, threads: int = 0, compute_type: str = "int8") -> Any:
    """A faster-whisper model on CPU (int8: 2-10x faster than float32 here); cached per process."""
    from faster_whisper import WhisperModel

    folder = whisper_model_dir(name)
    return WhisperModel(str(folder), device="cpu", compute_type=compute_type,
                        cpu_threads=threads or default_threads())


def transcribe(path: str | os.PathLike[str] | np.ndarray, model: str = DEFAULT_MODEL,
               language: str | None = None, threads: int = 0, vad: bool = True,
               beam_size: int = 5, prompt: str | None = None, temperature: float = 0.0,
               progress: bool | None = None, compute_type: str = "int8") -> Transcript:
    """Transcribe one audio file (or 16 kHz mono float32 samples, as `load_audio` gives);
    `progress` None shows a bar on stderr for files of at least PROGRESS_MIN_S seconds."""
    if model.endswith(".en") and language not in (None, "en"):
        raise LlamaworksError(f"the Whisper model {model} is English-only; pass --language en "
                              f"or use --model base")
    audio = load_audio(path) if isinstance(path, (str, os.PathLike)) else path
    duration = audio.size / SAMPLE_RATE
    whisper = load_whisper(model, threads, compute_type)
    try:
        segs, info = whisper.transcribe(audio, language=language, vad_filter=vad,
                                        beam_size=beam_size, initial_prompt=prompt,
                                        temperature=temperature,
                                        condition_on_previous_text=False)
    except ValueError as e:  # an unknown language code
        raise LlamaworksError(f"--language {language}: {e}") from None
    show = duration >= PROGRESS_MIN_S if progress is None else progress
    out: list[Segment] = []
    from tqdm import tqdm

    with tqdm(total=round(duration, 1), unit="s", desc="transcribe", disable=not show,
              file=sys.stderr, leave=False) as bar:
        for s in segs:
            out.append(Segment(len(out), round(s.start, 3), round(s.end, 3), s.text.strip(),
                               s.avg_logprob, s.no_speech_prob, s.compression_ratio,
                               list(s.tokens)))
            bar.update(max(0.0, round(min(s.end, duration) - bar.n, 1)))
    text = " ".join(s.text for s in out if s.text)
    return Transcript(text, info.language, round(duration, 3), out, model)


def _stamp(t: float, sep: str) -> str:
    ms = round(t * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def format_transcript(t: Transcript, fmt: str) -> str:
    """The transcript as OpenAI's `response_format` values render it."""
    if fmt == "text":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps({"text": t.text}, ensure_ascii=False) + "\n"
    if fmt == "verbose_json":
        return json.dumps({
            "task": "transcribe", "language": t.language, "duration": t.duration,
            "text": t.text, "segments": [{
                "id": s.id, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                "tokens": s.tokens, "temperature": 0.0, "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                for s in t.segments]}, ensure_ascii=False) + "\n"
    if fmt == "srt":
        return "".join(f"{i + 1}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text}\n\n"
                       for i, s in enumerate(t.segments))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n"
                                      f"{s.text}\n\n" for s in t.segments)
    raise LlamaworksError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
            "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


_CONTRACTIONS = (("n't", " not"), ("'re", " are"), ("'ll", " will"), ("'ve", " have"),
                 ("'m", " am"))


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation, hyphens split, common contractions expanded and
    digits 0-10 spelled out: the comparison the word error rate is measured on."""
    import re

    text = text.lower().replace("\u2019", "'").replace("-", " ")
    for short, full in _CONTRACTIONS:
        text = text.replace(short, full)
    words = re.sub(r"[^\w\s']", " ", text).split()
    return [_NUMBERS.get(w, w) for w in (w.strip("'") for w in words) if w]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over
    `normalize_words`."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return float(bool(hyp))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)
