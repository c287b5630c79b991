"""Voice: speech synthesized by each engine (piper's joe, espeak-ng) and transcribed back by each
Whisper model (base, tiny.en) within a word error rate; subtitles with monotone timestamps over a
60 s file with silences; clear errors (exit 2, nothing written) on bad input; valid WAV files
written atomically; sentence streaming. Every engine and model is installed by `make`, so none is
skipped."""

from __future__ import annotations

import array
import re
import wave
from pathlib import Path

import pytest

from llamaworks.cli import main
from llamaworks.voice import encode, tts
from llamaworks.voice.asr import normalize_words, transcribe, word_error_rate

ENGINES = ("joe", "espeak")
MODELS = ("base", "tiny.en")
TEXT = ("The weather today is clear and bright. Our train leaves the station at seven in the "
        "morning. Please bring a warm coat and a bottle of water.")
# Measured 2026-12-01 on this sentence: WER 0.0 for every engine x model except espeak -> tiny.en
# (0.04, one word); the bound leaves room for a different CPU's rounding.
MAX_WER = 0.15


def _read(path: Path) -> tuple[array.array, int]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return array.array("h", w.readframes(w.getnframes())), w.getframerate()


def _rms(samples: array.array) -> float:
    return (sum(x * x for x in samples[::7]) / max(1, len(samples[::7]))) ** 0.5


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("voice")
    paths = {}
    for voice in ENGINES:
        paths[voice] = out / f"{voice}.wav"
        tts.speak_to_wav(TEXT, paths[voice], voice)
    return paths


# -- units -------------------------------------------------------------------------------------
def test_split_sentences() -> None:
    assert tts.split_sentences("Hi there.  How are you?\nFine!\n\nNew paragraph") == [
        "Hi there.", "How are you?", "Fine!", "New paragraph"]
    assert tts.split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]
    assert tts.split_sentences("  \n ") == [] == tts.split_sentences("... -")
    assert tts.split_sentences("Hello. ... Bye.") == ["Hello.", "Bye."]


def test_word_error_rate() -> None:
    assert word_error_rate("a b c d", "a x c d") == 0.25
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("I have 3 cats. You're late.", "i have three cats you are late") == 0
    assert normalize_words("North-west") == ["north", "west"]


def test_every_engine_is_installed() -> None:
    assert tts.available_engines() == list(ENGINES)


# -- round trip --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("voice", ENGINES)
def test_round_trip_word_error_rate(clips: dict[str, Path], voice: str, model: str) -> None:
    t = transcribe(clips[voice], model, threads=1)
    assert t.language == "en"
    assert word_error_rate(TEXT, t.text) <= MAX_WER, t.text
    assert t.segments and all(s.start < s.end for s in t.segments)


@pytest.mark.slow
@pytest.mark.parametrize("ext,codec", [("mp3", "libmp3lame"), ("flac", "flac")])
def test_other_audio_formats(clips: dict[str, Path], tmp_path: Path, ext: str, codec: str) -> None:
    """Files PyAV encodes (MP3, FLAC) decode through the same path as WAV."""
    import av
    import numpy as np

    samples, rate = _read(clips["joe"])
    path = tmp_path / f"speech.{ext}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, dtype=np.int16).reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    t = transcribe(path, "tiny.en", threads=1)
    assert word_error_rate(TEXT, t.text) <= MAX_WER, t.text


@pytest.mark.slow
def test_subtitles_on_60_s_with_silences(clips: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Speech, 12 s of silence, speech, 12 s, ... up to over 60 s: srt and vtt cues in order,
    monotone, inside the audio and covering the speech at both ends; a progress bar on stderr."""
    speech, rate = _read(clips["joe"])
    gap = array.array("h", bytes(2 * 12 * rate))
    long, blocks = array.array("h"), 1
    while len(long) < 60 * rate:
        long += speech + gap
        blocks += 1
    long += speech
    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(long.tobytes())
    duration = len(long) / rate
    for fmt, sep in (("srt", ","), ("vtt", ".")):
        assert main(["transcribe", str(path), "--format", fmt, "--model", "tiny.en",
                     "--threads", "1"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("WEBVTT\n\n" if fmt == "vtt" else "1\n")
        assert "transcribe" in err  # tqdm's bar on a file of 60 s or more
        stamps = re.findall(rf"(\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d) --> "
                            rf"(\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d)", out)
        times = [(int(a) * 3600 + int(b) * 60 + int(c) + int(d) / 1000,
                  int(e) * 3600 + int(f) * 60 + int(g) + int(h) / 1000)
                 for a, b, c, d, e, f, g, h in stamps]
        assert len(times) >= blocks  # a cue per speech block at least
        flat = [x for pair in times for x in pair]
        assert flat == sorted(flat) and all(s < e for s, e in times)
        assert times[0][0] <= 2.0 and duration - 3.0 <= times[-1][1] <= duration + 0.5
        assert word_error_rate(" ".join([TEXT] * blocks), re.sub(r".*-->.*|^\d+$|WEBVTT", "", out,
                                                             flags=re.M)) <= MAX_WER


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "text", "empty", "random", "folder"])
def test_transcribe_bad_input_exit_2(tmp_path: Path, kind: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in.wav"
    if kind == "text":
        path.write_text("this is not audio\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "folder":
        path.mkdir()
    assert main(["transcribe", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and str(path) in err and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["in.wav"])


def test_speak_bad_input_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    for argv in (["--voice", "nobody", "--text", "Hi."], ["--text", "  "],
                 ["--file", str(tmp_path / "missing.txt")], ["--text", "Hi.", "--speed", "9"],
                 ["--text", "Hi.", "--variation", "2"], ["--text", "Hi.", "--file", "x"]):
        assert main(["speak", "--out", str(out), *argv]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def test_missing_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tts, "espeak_program", lambda: None)
    with pytest.raises(tts.LlamaworksError, match="apt-get install espeak-ng"):
        tts.open_engine("espeak")


# -- speak -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("voice", ENGINES)
def test_speak_writes_a_valid_wav(tmp_path: Path, voice: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.wav"
    assert main(["speak", "--text", "Hello there. This is a test.", "--out", str(out),
                 "--voice", voice]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (2 sentences, ")
    samples, rate = _read(out)
    assert rate == 22050 and 1.0 < len(samples) / rate < 10.0
    assert _rms(samples) > 300  # not silent
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temporary file left


def test_speak_speed_shortens_the_audio(tmp_path: Path) -> None:
    text = "Speaking faster makes the same words shorter."
    _, slow, _ = tts.speak_to_wav(text, tmp_path / "a.wav", "espeak", 1.0)
    _, fast, _ = tts.speak_to_wav(text, tmp_path / "b.wav", "espeak", 2.0)
    assert fast < 0.7 * slow


@pytest.mark.slow
def test_piper_at_variation_0_speaks_the_same_text_as_the_same_audio(tmp_path: Path) -> None:
    """Variation 0 turns off piper's sampling noise (same text, same samples); the published
    voice (variation 1) draws new noise for every synthesis."""
    text = "The same words, twice."
    a, b, c, d = (tmp_path / f"{n}.wav" for n in "abcd")
    for path, variation in ((a, 0.0), (b, 0.0), (c, 1.0), (d, 1.0)):
        tts.speak_to_wav(text, path, "joe", variation=variation)
    assert _read(a) == _read(b)
    assert _read(c) != _read(d) and _read(a) != _read(c)


def test_speak_failure_mid_text_keeps_the_old_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the first sentence was written leaves the old file and no temporary."""
    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    real = tts.EspeakEngine.synth

    def synth(self: tts.EspeakEngine, sentence: str) -> tuple[bytes, int]:
        if sentence.startswith("Second"):
            raise tts.LlamaworksError("engine died")
        return real(self, sentence)

    monkeypatch.setattr(tts.EspeakEngine, "synth", synth)
    with pytest.raises(tts.LlamaworksError, match="engine died"):
        tts.speak_to_wav("First one. Second one.", out, "espeak")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.wav"]


@pytest.mark.slow
@pytest.mark.parametrize("voice", ENGINES)
def test_streaming_yields_the_first_sentence_before_the_last_is_synthesized(
        voice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real_open = tts.open_engine

    def open_engine(v: str | None, speed: float,
                    variation: float = 1.0) -> tts.PiperEngine | tts.EspeakEngine:
        engine = real_open(v, speed, variation=variation)
        real_synth = engine.synth

        def synth(sentence: str) -> tuple[bytes, int]:
            asked.append(sentence)
            return real_synth(sentence)

        engine.synth = synth  # type: ignore[method-assign]
        return engine

    monkeypatch.setattr(tts, "open_engine", open_engine)
    gen = tts.synthesize("One fish. Two fish. Red fish, blue fish.", voice)
    first = next(gen)
    assert first.text == "One fish." and first.seconds > 0.3 and asked == ["One fish."]
    rest = list(gen)
    assert [s.text for s in rest] == ["Two fish.", "Red fish, blue fish."]
    assert asked == ["One fish.", "Two fish.", "Red fish, blue fish."]


@pytest.mark.slow
@pytest.mark.parametrize("ext,codec,rate", [("mp3", "mp3", 22_050), ("flac", "flac", 22_050),
                                            ("opus", "opus", 48_000), ("ogg", "opus", 48_000),
                                            ("aac", "aac", 22_050)])
def test_speak_writes_mp3_flac_opus_and_aac(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            ext: str, codec: str, rate: int) -> None:
    """`speak --out X.mp3|.flac|.opus|.aac` (PyAV's encoders): decoded back by PyAV, the codec
    and rate are the format's, the length is what `speak` reported, and it transcribes back."""
    import av

    out = tmp_path / f"speech.{ext}"
    assert main(["speak", "--text", TEXT, "--out", str(out)]) == 0
    m = re.match(rf"wrote {re.escape(str(out))} \(3 sentences, ([\d.]+) s at {rate} Hz\)",
                 capsys.readouterr().out)
    assert m, "speak's report"
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name.startswith(codec)
    pcm, got_rate = encode.decode_to_pcm(out.read_bytes())
    assert got_rate == rate and abs(len(pcm) / 2 / rate - float(m.group(1))) < 0.1
    assert word_error_rate(TEXT, transcribe(out, "tiny.en", threads=1).text) <= MAX_WER
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_speak_to_an_unknown_ending_or_without_the_encoder_is_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    assert main(["speak", "--text", "Hi.", "--out", str(tmp_path / "a.xyz")]) == 2
    assert "unknown audio file ending '.xyz'" in capsys.readouterr().err
    monkeypatch.setitem(encode.FORMATS, "mp3",
                        dataclasses.replace(encode.FORMATS["mp3"], codec="libnotlame"))
    assert main(["speak", "--text", "Hi.", "--out", str(tmp_path / "a.mp3")]) == 2
    err = capsys.readouterr().err
    assert "has no libnotlame encoder, so mp3 cannot be written; use wav" in err
    assert list(tmp_path.iterdir()) == []
    assert "mp3" not in encode.available_formats() and "flac" in encode.available_formats()


def test_every_openai_speech_format_has_its_encoder_here() -> None:
    """PyAV's wheel (installed with faster-whisper) carries libmp3lame, flac, libopus and aac."""
    assert encode.available_formats() == ["wav", "pcm", "mp3", "flac", "opus", "aac"]


def test_speakable_drops_markdown_markers() -> None:
    assert tts.speakable("**Paris** is the `capital`.") == "Paris is the capital."
    assert tts.speakable("1. Preheat the oven.") == "Preheat the oven."
    assert tts.speakable("- an item") == "an item" and tts.speakable("## Title") == "Title"
    assert tts.speakable("It is 3.5 m, not 4.") == "It is 3.5 m, not 4."


@pytest.mark.slow
def test_base_model_is_joined_from_its_two_packages(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from llamaworks.voice import models

    monkeypatch.setenv("LLAMAWORKS_CACHE", str(tmp_path))
    d = models.whisper_base_dir()
    assert d == tmp_path / "models" / "faster-whisper-base"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                   "vocabulary.txt"]
    assert (d / "model.bin").stat().st_size == models.BASE_BIN_BYTES  # sha256 checked on join
    assert models.whisper_base_dir() == d  # found, not joined again


@pytest.mark.slow
def test_json_formats_and_a_detected_language(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """base (the default) detects German in espeak-ng's German voice; json is {"text"} and
    verbose_json carries duration and segments with timestamps inside it."""
    import json

    path = tmp_path / "de.wav"
    tts.speak_to_wav("Guten Morgen. Der Zug fährt um sieben Uhr ab.", path, "espeak:de")
    assert main(["transcribe", str(path), "--format", "verbose_json", "--threads", "1"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["language"] == "de" and "Guten Morgen" in v["text"] and v["segments"]
    assert 0 <= v["segments"][0]["start"] < v["segments"][-1]["end"] <= v["duration"] + 0.5
    assert main(["transcribe", str(path), "--json", "--language", "de", "--threads", "1"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["text"]
