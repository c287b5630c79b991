"""Speech audio out: 16-bit mono PCM encoded as it arrives, to a file (written atomically) or a
stream (the server's `/v1/audio/speech`).

Formats: `wav` (Python's `wave`; a stream gets the open-ended header streaming servers write),
`pcm` (the raw samples), and through PyAV (FFmpeg's encoders, installed with faster-whisper) `mp3`
(libmp3lame), `flac`, `opus` (libopus in Ogg, 48 kHz: the only rates Opus takes are 8-48 kHz
steps, so the voice is resampled by FFmpeg) and `aac` (FFmpeg's own encoder, in ADTS frames as
OpenAI sends it). A PyAV build without one of these encoders makes that format a clear error
(`missing_encoder`), never a silent fallback.
"""

from __future__ import annotations

import io
import os
import struct
import wave
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llamaworks.errors import LlamaworksError


@dataclass(frozen=True)
class Format:
    name: str
    media_type: str
    codec: str | None = None  # PyAV encoder; None: written here (wav, pcm)
    container: str | None = None
    rate: int | None = None  # the codec's sample rate when it cannot take the voice's own
    options: tuple[tuple[str, str], ...] = ()  # container options


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("wav", "audio/wav"),
    Format("pcm", "audio/pcm"),
    Format("mp3", "audio/mpeg", "libmp3lame", "mp3"),
    Format("flac", "audio/flac", "flac", "flac"),
    # Ogg pages every 100 ms (the muxer's default is 1 s), so a stream's first page leaves early
    Format("opus", "audio/ogg", "libopus", "ogg", 48_000, (("page_duration", "100000"),)),
    Format("aac", "audio/aac", "aac", "adts"),
)}
# File name endings `speak --out` and `chat --voice-out` understand (none: WAV).
EXTENSIONS = {"": "wav", ".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".opus": "opus",
              ".ogg": "opus", ".aac": "aac"}


def missing_encoder(name: str) -> str | None:
    """Why `name` cannot be encoded here (None: it can)."""
    fmt = FORMATS.get(name)
    if fmt is None:
        return f"unknown audio format {name!r}: use one of {', '.join(FORMATS)}"
    if fmt.codec is None:
        return None
    try:
        import av
    except ImportError:
        return f"{name} needs PyAV (pip install av), which is not installed"
    try:
        av.codec.Codec(fmt.codec, "w")
    except Exception:  # av.codec.codec.UnknownCodecError
        return (f"this PyAV build (av {av.__version__}) has no {fmt.codec} encoder, so {name} "
                f"cannot be written; use wav")
    return None


def available_formats() -> list[str]:
    """The formats this machine can write."""
    return [n for n in FORMATS if missing_encoder(n) is None]


def format_for_path(path: str | os.PathLike[str]) -> str:
    """The audio format a file name asks for (by its ending; none: wav), or a clear error."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise LlamaworksError(f"{path}: unknown audio file ending {suffix!r}; use "
                              f"{', '.join(e for e in EXTENSIONS if e)}")
    name = EXTENSIONS[suffix]
    if (why := missing_encoder(name)) is not None:
        raise LlamaworksError(f"{path}: {why}")
    return name


def stream_wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming
    servers write them; decoders read to the end of the data)."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" +
            struct.pack("<I", 0xFFFFFFFF))


class _Collect:
    """A write-only sink (no seek: muxers write as for a pipe) whose bytes are taken out."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class Encoder:
    """16-bit mono PCM at `rate` in (`write`), encoded bytes out: returned by `write`/`close`
    when `sink` is None (a stream), else written to `sink` (a seekable binary file, so FLAC and
    MP3 get their headers completed at the end and WAV its sizes)."""

    def __init__(self, name: str, rate: int, sink: BinaryIO | None = None):
        if (why := missing_encoder(name)) is not None:
            raise LlamaworksError(why)
        self.fmt, self.rate, self.samples = FORMATS[name], rate, 0
        self._collect = _Collect() if sink is None else None
        out: Any = sink if sink is not None else self._collect
        self._av: Any = None
        self._wave: wave.Wave_write | None = None
        if self.fmt.codec is not None:
            import av

            self._av = av.open(out, "w", format=self.fmt.container,
                               options=dict(self.fmt.options))
            self._stream = self._av.add_stream(self.fmt.codec, rate=self.fmt.rate or rate,
                                               layout="mono")
        elif name == "wav" and sink is not None:
            self._wave = wave.open(sink, "wb")
            self._wave.setnchannels(1)
            self._wave.setsampwidth(2)
            self._wave.setframerate(rate)
        elif name == "wav":
            out.write(stream_wav_header(rate))
        self._raw = out  # pcm, and a streamed wav's samples

    def _ready(self) -> bytes:
        return self._collect.take() if self._collect is not None else b""

    def write(self, pcm: bytes) -> bytes:
        """Encode `pcm` (16-bit little-endian mono); returns the bytes ready (a stream)."""
        n = len(pcm) // 2
        if self._av is not None:
            if n:
                import av
                import numpy as np

                frame = av.AudioFrame.from_ndarray(
                    np.frombuffer(pcm[:2 * n], dtype="<i2").reshape(1, n), format="s16",
                    layout="mono")
                frame.sample_rate, frame.pts = self.rate, self.samples
                for packet in self._stream.encode(frame):
                    self._av.mux(packet)
        elif self._wave is not None:
            self._wave.writeframes(pcm[:2 * n])
        else:
            self._raw.write(pcm[:2 * n])
        self.samples += n
        return self._ready()

    def close(self) -> bytes:
        """Flush the encoder and finish the container; returns the last bytes (a stream)."""
        if self._av is not None:
            for packet in self._stream.encode(None):
                self._av.mux(packet)
            self._av.close()
        elif self._wave is not None:
            self._wave.close()
        return self._ready()

    @property
    def seconds(self) -> float:
        return self.samples / self.rate


def encode_pcm(pcm: bytes, rate: int, name: str) -> bytes:
    """`pcm` encoded whole (a convenience for tests and one-off conversions)."""
    enc = Encoder(name, rate)
    return enc.write(pcm) + enc.close()


class SpeechFile:
    """An audio file written as speech arrives, atomically: the first `add` opens a temporary
    file beside `path` (nothing exists before), a clean exit of the `with` block renames it to
    `path`, an exception (or no audio at all) leaves no file and an existing `path` untouched.
    Sentences after the first are preceded by `gap_s` seconds of silence."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None,
                 gap_s: float = 0.25):
        self.path = Path(path)
        self.name = name or format_for_path(path)
        if (why := missing_encoder(self.name)) is not None:
            raise LlamaworksError(f"{path}: {why}")
        if self.path.is_dir():
            raise LlamaworksError(f"{path} is a directory; pass a file name")
        self.gap_s, self.sentences, self.rate = gap_s, 0, 0
        self._stack = ExitStack()
        self._encoder: Encoder | None = None

    def __enter__(self) -> SpeechFile:
        return self

    def add(self, pcm: bytes, rate: int) -> None:
        from llamaworks.atomic import atomic_path

        if self._encoder is None:
            tmp = self._stack.enter_context(atomic_path(self.path))
            f = self._stack.enter_context(open(tmp, "wb"))
            self.rate = rate
            self._encoder = Encoder(self.name, rate, f)
        elif rate != self.rate:
            raise LlamaworksError("the speech changed sample rate between sentences")
        else:
            self._encoder.write(bytes(2 * int(self.gap_s * rate)))
        self._encoder.write(pcm)
        self.sentences += 1

    @property
    def seconds(self) -> float:
        return self._encoder.seconds if self._encoder is not None else 0.0

    @property
    def file_rate(self) -> int:
        """The sample rate in the file (Opus: 48 kHz whatever the voice's)."""
        return FORMATS[self.name].rate or self.rate

    @property
    def written(self) -> bool:
        return self._encoder is not None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if self._encoder is not None:  # finished either way (the temporary file is still open)
            try:
                self._encoder.close()
            except BaseException as e:
                if kind is None:
                    self._stack.__exit__(type(e), e, e.__traceback__)
                    raise
        return bool(self._stack.__exit__(kind, exc, tb))


def decode_to_pcm(data: bytes) -> tuple[bytes, int]:
    """Any audio bytes PyAV reads -> (16-bit mono PCM, sample rate): for tests and checks."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        rate = stream.rate
        res = av.AudioResampler(format="s16", layout="mono", rate=rate)
        parts = [f.to_ndarray().reshape(-1) for fr in c.decode(stream) for f in res.resample(fr)]
        parts += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    return (np.concatenate(parts).astype("<i2").tobytes() if parts else b""), rate
