"""OpenAI's audio endpoints over `llamaworks.voice`: `POST /v1/audio/transcriptions` and
`/v1/audio/translations` (multipart upload, faster-whisper) and `POST /v1/audio/speech` (JSON,
the voice's engine, streamed sentence by sentence as wav, pcm, or mp3/flac/opus/aac encoded by
PyAV as the sentences arrive: `voice.encode`).

The Whisper model loads on the first request and is shared by the process (`asr.load_whisper`
caches it); transcriptions run in the threadpool one at a time (an `asyncio.Lock`), so the event
loop and the chat scheduler keep running while one is decoded. Speech engines (a piper or
espeak-ng process per voice and speed) are kept open between requests and used one sentence at a
time under a per-engine lock. Bad audio is a 400 with the decoder's reason, an upload over
`max_audio_bytes` a 413; auth and the Host/Origin rules are the app's.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from llamaworks.errors import LlamaworksError
from llamaworks.serve.schemas import APIError, parse_json, validation_error
from llamaworks.voice import asr, encode, tts
from llamaworks.voice.models import WHISPER_MODELS

# Model ids a client may send for transcription: OpenAI's names mean our default (`base`).
ASR_ALIASES = {"whisper-1": asr.DEFAULT_MODEL, "gpt-4o-transcribe": asr.DEFAULT_MODEL,
               "gpt-4o-mini-transcribe": asr.DEFAULT_MODEL}
TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's voices speak with our default voice; ours (joe, espeak, espeak:VOICE) pass through.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                           "sage", "shimmer", "verse"})
# OpenAI's response formats; mp3/flac/opus/aac where this PyAV build has the encoder (else 400).
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
PCM_RATE = 24_000  # OpenAI's `pcm`: 16-bit little-endian mono at 24 kHz
MAX_INPUT_CHARS = 4096
FORM_SLACK = 1 << 20  # the other form fields and multipart framing beside the file
# Whisper's language codes -> the names OpenAI's verbose_json reports.
LANGUAGE_NAMES = dict(p.split(":") for p in (
    "en:english,zh:chinese,de:german,es:spanish,ru:russian,ko:korean,fr:french,ja:japanese,"
    "pt:portuguese,tr:turkish,pl:polish,ca:catalan,nl:dutch,ar:arabic,sv:swedish,it:italian,"
    "id:indonesian,hi:hindi,fi:finnish,vi:vietnamese,he:hebrew,uk:ukrainian,el:greek,ms:malay,"
    "cs:czech,ro:romanian,da:danish,hu:hungarian,ta:tamil,no:norwegian,th:thai,ur:urdu,"
    "hr:croatian,bg:bulgarian,lt:lithuanian,la:latin,mi:maori,ml:malayalam,cy:welsh,sk:slovak,"
    "te:telugu,fa:persian,lv:latvian,bn:bengali,sr:serbian,az:azerbaijani,sl:slovenian,"
    "kn:kannada,et:estonian,mk:macedonian,br:breton,eu:basque,is:icelandic,hy:armenian,"
    "ne:nepali,mn:mongolian,bs:bosnian,kk:kazakh,sq:albanian,sw:swahili,gl:galician,mr:marathi,"
    "pa:punjabi,si:sinhala,km:khmer,sn:shona,yo:yoruba,so:somali,af:afrikaans,oc:occitan,"
    "ka:georgian,be:belarusian,tg:tajik,sd:sindhi,gu:gujarati,am:amharic,yi:yiddish,lo:lao,"
    "uz:uzbek,fo:faroese,ht:haitian creole,ps:pashto,tk:turkmen,nn:nynorsk,mt:maltese,"
    "sa:sanskrit,lb:luxembourgish,my:myanmar,bo:tibetan,tl:tagalog,mg:malagasy,as:assamese,"
    "tt:tatar,haw:hawaiian,ln:lingala,ha:hausa,ba:bashkir,jw:javanese,su:sundanese,"
    "yue:cantonese").split(","))


def language_name(code: str) -> str:
    """OpenAI's spelling of a Whisper language code ("en" -> "english")."""
    return LANGUAGE_NAMES.get(code, code)


class SpeechRequest(BaseModel):
    """The body of `POST /v1/audio/speech`."""
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str
    response_format: str = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None  # accepted, not used: our voices take no instructions


def _resample(pcm: bytes, rate: int, to: int) -> bytes:
    """16-bit PCM resampled by linear interpolation (upsampling 22,050 -> 24,000 Hz here)."""
    if rate == to or not pcm:
        return pcm
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    n = max(1, round(len(x) * to / rate))
    y = np.interp(np.arange(n) * (rate / to), np.arange(len(x)), x)
    return np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes()


class _Engines:
    """Speech engines kept open per (voice, speed), each used by one sentence at a time."""

    def __init__(self, keep: int = 4):
        self.keep, self.lock = keep, threading.Lock()
        self.open: dict[tuple[str | None, float], tuple[Any, threading.Lock]] = {}

    def get(self, voice: str | None, speed: float) -> tuple[Any, threading.Lock]:
        with self.lock:
            key = (voice, speed)
            if key not in self.open:
                if len(self.open) >= self.keep:
                    old, _ = self.open.pop(next(iter(self.open)))
                    old.close()
                self.open[key] = (tts.open_engine(voice, speed), threading.Lock())
            return self.open[key]

    def drop(self, voice: str | None, speed: float) -> None:
        with self.lock:
            if (got := self.open.pop((voice, speed), None)) is not None:
                got[0].close()

    def close(self) -> None:
        with self.lock:
            for engine, _ in self.open.values():
                engine.close()
            self.open.clear()


def add_audio_routes(app: FastAPI, authorize: Callable[[Request], None],
                     max_audio_bytes: int = 25 << 20, asr_model: str = asr.DEFAULT_MODEL,
                     asr_threads: int = 0) -> None:
    """Mount the audio endpoints on `app`. `max_audio_bytes`: the largest upload (413 above).
    `asr_model`: what `whisper-1` means. `asr_threads`: faster-whisper's CPU threads (0: all)."""
    asr_lock = asyncio.Lock()
    engines = _Engines()
    app.state.speech_engines = engines

    async def read_form(request: Request) -> tuple[bytes, str, dict[str, Any]]:
        authorize(request)
        too_big = APIError(413, f"the audio file is larger than {max_audio_bytes} bytes "
                           f"({max_audio_bytes / (1 << 20):g} MB)", param="file",
                           code="request_too_large")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_audio_bytes + FORM_SLACK:
            raise too_big
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise APIError(415, f"the body must be multipart/form-data (not {ctype or 'none'!r})",
                           code="unsupported_media_type")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > max_audio_bytes + FORM_SLACK:
                raise too_big
        request._body = bytes(raw)  # form() parses the body already read
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # a malformed multipart body
            raise APIError(400, f"the form cannot be parsed: {e}", code="invalid_form") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "the form has no 'file' upload", param="file",
                           code="missing_file")
        data = await upload.read()
        if len(data) > max_audio_bytes:
            raise too_big
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        fields["timestamp_granularities"] = form.getlist("timestamp_granularities[]")
        return data, upload.filename or "audio", fields

    def whisper_name(fields: dict[str, Any]) -> str:
        model = fields.get("model") or ""
        if not model:
            raise APIError(400, "the form has no 'model' field", param="model",
                           code="missing_model")
        if model not in ASR_ALIASES and model not in WHISPER_MODELS:
            raise APIError(400, f"unknown transcription model {model!r}: use whisper-1 (= "
                           f"{asr_model}) or one of {', '.join(WHISPER_MODELS)}",
                           param="model", code="model_not_found")
        return asr_model if model in ASR_ALIASES else model

    def run_whisper(data: bytes, filename: str, model: str, task: str, language: str | None,
                    prompt: str | None, temperature: float, words: bool) -> dict[str, Any]:
        suffix = Path(filename).suffix[:16]
        with tempfile.NamedTemporaryFile(suffix=suffix, prefix="llamaworks-audio-") as f:
            f.write(data)
            f.flush()
            try:
                audio = asr.load_audio(f.name)
            except LlamaworksError as e:
                raise APIError(400, str(e).replace(f.name, filename), param="file",
                               code="invalid_audio") from None
        whisper = asr.load_whisper(model, asr_threads)
        try:
            segs, info = whisper.transcribe(audio, task=task, language=language,
                                            vad_filter=True, beam_size=5,
                                            initial_prompt=prompt, temperature=temperature,
                                            condition_on_previous_text=False,
                                            word_timestamps=words)
            out = []
            for s in segs:
                seg = {"id": len(out), "seek": int(s.seek), "start": round(float(s.start), 3),
                       "end": round(float(s.end), 3), "text": s.text.strip(),
                       "tokens": list(s.tokens), "temperature": float(s.temperature or 0.0),
                       "avg_logprob": float(s.avg_logprob),
                       "compression_ratio": float(s.compression_ratio),
                       "no_speech_prob": float(s.no_speech_prob)}
                if words:
                    seg["words"] = [{"word": w.word.strip(), "start": round(float(w.start), 3),
                                     "end": round(float(w.end), 3)} for w in s.words or ()]
                out.append(seg)
        except ValueError as e:  # an unknown language code
            raise APIError(400, f"language {language!r}: {e}", param="language",
                           code="invalid_value") from None
        return {"task": "translate" if task == "translate" else "transcribe",
                "language": language_name(info.language),
                "duration": round(audio.size / asr.SAMPLE_RATE, 3),
                "text": " ".join(s["text"] for s in out if s["text"]), "segments": out}

    async def audio_text(request: Request, task: str) -> Response:
        data, filename, fields = await read_form(request)
        model = whisper_name(fields)
        fmt = fields.get("response_format") or "json"
        if fmt not in asr.FORMATS:
            raise APIError(400, f"response_format {fmt!r}: use one of {', '.join(asr.FORMATS)}",
                           param="response_format", code="invalid_value")
        language = fields.get("language") or None
        if task == "translate":
            language = None  # the source language is detected; the output is English
        if model.endswith(".en") and (task == "translate" or language not in (None, "en")):
            raise APIError(400, f"the Whisper model {model} is English-only: it cannot "
                           f"{'translate' if task == 'translate' else f'transcribe {language}'}"
                           f"; use whisper-1 or base", param="model", code="invalid_value")
        try:
            temperature = float(fields.get("temperature") or 0.0)
        except ValueError:
            raise APIError(400, f"temperature {fields['temperature']!r} is not a number",
                           param="temperature", code="invalid_value") from None
        if not 0.0 <= temperature <= 1.0:
            raise APIError(400, "temperature must be between 0 and 1", param="temperature",
                           code="invalid_value")
        grains = set(fields["timestamp_granularities"]) or {"segment"}
        if grains - {"segment", "word"}:
            raise APIError(400, f"timestamp_granularities {sorted(grains)}: use segment and/or "
                           f"word", param="timestamp_granularities", code="invalid_value")
        words = "word" in grains
        async with asr_lock:
            result = await run_in_threadpool(run_whisper, data, filename, model, task, language,
                                             fields.get("prompt") or None, temperature, words)
        if fmt == "verbose_json":
            if words:
                result["words"] = [w for s in result["segments"] for w in s.get("words", [])]
            if grains == {"word"}:
                result["segments"] = [{k: v for k, v in s.items() if k != "words"}
                                      for s in result["segments"]]
            return Response(json.dumps(result, ensure_ascii=False), media_type="application/json")
        if fmt == "json":
            return Response(json.dumps({"text": result["text"]}, ensure_ascii=False),
                            media_type="application/json")
        t = asr.Transcript(result["text"], result["language"], result["duration"],
                           [asr.Segment(s["id"], s["start"], s["end"], s["text"])
                            for s in result["segments"]], model)
        media = "text/vtt" if fmt == "vtt" else "text/plain"
        return PlainTextResponse(asr.format_transcript(t, fmt), media_type=media)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        """OpenAI's transcription endpoint (faster-whisper)."""
        return await audio_text(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        """OpenAI's translation endpoint: speech in any language to English text (base)."""
        return await audio_text(request, "translate")

    def speak_one(voice: str | None, speed: float, sentence: str) -> tts.Speech:
        engine, lock = engines.get(voice, speed)
        try:
            with lock:
                pcm, rate = engine.synth(sentence)
        except LlamaworksError:
            engines.drop(voice, speed)  # a dead engine process: the next request opens another
            raise
        return tts.Speech(sentence, pcm, rate)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        """OpenAI's speech endpoint: the audio streamed sentence by sentence (WAV, 24 kHz PCM, or
        MP3/FLAC/Opus/AAC encoded as it comes)."""
        authorize(request)
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > 8 * MAX_INPUT_CHARS + 4096:
                raise APIError(413, "the request body is too large for a speech request",
                               code="request_too_large")
        try:
            body = SpeechRequest.model_validate(parse_json(bytes(raw)))
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model not in TTS_MODELS:
            raise APIError(400, f"unknown speech model {body.model!r}: use one of "
                           f"{', '.join(TTS_MODELS)}", param="model", code="model_not_found")
        fmt = body.response_format
        if fmt not in SPEECH_FORMATS:
            raise APIError(400, f"response_format {fmt!r}: use one of "
                           f"{', '.join(SPEECH_FORMATS)}", param="response_format",
                           code="invalid_value")
        if (why := encode.missing_encoder(fmt)) is not None:
            raise APIError(400, f"response_format {fmt!r} is not available on this server: "
                           f"{why}", param="response_format", code="unsupported_format")
        voice = None if body.voice in OPENAI_VOICES else body.voice
        sentences = tts.split_sentences(body.input)
        if not sentences:
            raise APIError(400, "nothing to speak: the input has no words", param="input",
                           code="invalid_value")
        try:  # the first sentence before answering: a bad voice is a 400, not a broken stream
            first = await run_in_threadpool(speak_one, voice, body.speed, sentences[0])
        except LlamaworksError as e:
            raise APIError(400, str(e), param="voice", code="invalid_value") from None
        pcm_out = fmt == "pcm"
        rate = PCM_RATE if pcm_out else first.sample_rate
        encoder = encode.Encoder(fmt, rate)

        def encoded(sp: tts.Speech, gap: bool) -> bytes:
            if sp.sample_rate != first.sample_rate:
                raise LlamaworksError("the engine changed sample rate between sentences")
            pcm = (bytes(2 * int(tts.SENTENCE_GAP_S * sp.sample_rate)) if gap else b"") + sp.pcm
            return encoder.write(_resample(pcm, sp.sample_rate, PCM_RATE) if pcm_out else pcm)

        def next_chunk(sentence: str) -> bytes:  # in the threadpool: synthesis and encoding
            return encoded(speak_one(voice, body.speed, sentence), True)

        async def chunks() -> AsyncIterator[bytes]:
            if data := await run_in_threadpool(encoded, first, False):
                yield data
            for s in sentences[1:]:
                if data := await run_in_threadpool(next_chunk, s):
                    yield data
            if data := await run_in_threadpool(encoder.close):
                yield data

        return StreamingResponse(chunks(), media_type=encode.FORMATS[fmt].media_type,
                                 headers={"X-Sample-Rate": str(encode.FORMATS[fmt].rate or rate)})
