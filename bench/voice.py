"""Voice real-time factors: synthesis with each installed engine (piper's joe, espeak-ng) and
transcription of each engine's speech with each Whisper model (int8, `--threads` threads); with
`--turn`, the latency of a voice turn instead.

Real-time factor = processing seconds / audio seconds (below 1 is faster than real time). For
synthesis the time runs from the call (engine process start included) to the last sentence, and
the first sentence's latency is printed too; for transcription, the model is loaded and warmed
once, outside the timing. Each measurement is repeated `--rounds` times and the best and median
are printed; the word error rate of each transcript against the text is printed alongside.

    .venv/bin/python bench/voice.py [--threads 2] [--rounds 3]

`--turn`: a spoken question (QUESTION, synthesized by piper at setup) goes through
`voice.turn.VoiceChat` on the default model (SmolLM2-135M-Instruct), `--threads` threads for
Whisper and the model; timed from the call (the end of the user's audio: the file is complete)
to the first byte of the spoken reply (the first sentence's PCM, what a player or the WAV gets
first), split into ASR (transcript ready), time to the first sentence (the delta that ended it)
and that sentence's synthesis. The session is warm, as in a conversation: models loaded, the
piper process running, one turn done before the timing; each timed turn starts a fresh
conversation (seed = round). `--asr-model` picks the Whisper model (default the turns' tiny.en);
`--tools calculator` asks TOOL_QUESTION through the agent loop instead (a tool call, then the
answer: "time to the first sentence" then spans both model turns and the call).

    .venv/bin/python bench/voice.py --turn [--threads 2] [--rounds 5] [--asr-model base]
                                           [--tools calculator]

`--whisper-cpp PATH/whisper-cli`: ASR speed against whisper.cpp on the same weights and file. Our
Whisper models are CTranslate2 folders with float16 weights; `ct2_to_ggml` writes them, unchanged,
as the ggml file whisper.cpp loads (its convert-pt-to-ggml.py layout: hparams, the 80x201 mel
filters, the byte tokens, float16 matrices and float32 vectors under OpenAI's tensor names, the
fused q/k/v projections split), so both programs run the very same numbers. whisper-cli is built
from the whisper.cpp sources inside PyPI's `pywhispercpp` sdist (BENCHMARKS.md says how). Both
run beam 5, no VAD (whisper-cli's needs a separate model), English given, `--threads` threads;
faster-whisper warmed and timed in process, whisper-cli timed as a process (its model load
included) and by its own report (total minus load).

    .venv/bin/python bench/voice.py --whisper-cpp /tmp/whisper.cpp/build/bin/whisper-cli
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

TEXT = ("The weather today is clear and bright. Our train leaves the station at seven in the "
        "morning, and the trip takes about three hours. Please bring a warm coat, a bottle of "
        "water and something to read. We will meet at the north entrance near the ticket office. "
        "If you are late, call me before the doors close.")


QUESTION = "What is the capital of France?"
TOOL_QUESTION = "What is 12 times 7?"


def turn_latency(args: argparse.Namespace) -> None:
    import dataclasses

    from llamaworks.voice.asr import word_error_rate
    from llamaworks.voice.tts import speak_to_wav
    from llamaworks.voice.turn import VoiceChat

    tmp = Path(tempfile.mkdtemp(prefix="bench-voice-turn-"))
    question = tmp / "question.wav"
    asked = TOOL_QUESTION if args.tools else QUESTION
    _, seconds, _ = speak_to_wav(asked, question, "joe")
    print(f"question {asked!r}: {seconds:.2f} s of piper speech; ASR {args.asr_model} "
          f"(language {args.language or 'default'}), {args.threads} threads"
          f"{f', tools {args.tools}' if args.tools else ''}", flush=True)
    rows = []
    with VoiceChat(threads=args.threads, asr_model=args.asr_model, tools=args.tools,
                   language=args.language) as chat:
        base = chat.params
        for r in range(-1, args.rounds):  # round -1: the warm-up turn
            chat.messages.clear()
            chat.params = dataclasses.replace(base, seed=max(r, 0))
            t0 = time.perf_counter()
            heard = first_sentence = first_audio = last_text = None
            sentence = reply = ""
            for ev in chat.turn(question):
                if ev.kind == "transcript":
                    heard = ev
                elif ev.kind == "text":
                    last_text = ev.at
                elif ev.kind == "audio" and first_audio is None:
                    first_audio, first_sentence, sentence = ev.at, last_text, ev.text
                elif ev.kind == "done":
                    reply, done = ev.text, ev.at
            wall = time.perf_counter() - t0
            assert heard is not None and first_audio is not None and first_sentence is not None
            row = (heard.at, first_sentence - heard.at, first_audio - first_sentence,
                   first_audio, done, wall)
            if r >= 0:
                rows.append(row)
            print(f"{'warm-up' if r < 0 else f'round {r}':8s} ASR {row[0]:.3f} s  first sentence "
                  f"+{row[1]:.3f} s  its TTS +{row[2]:.3f} s  = first audio {row[3]:.3f} s  "
                  f"(reply done {row[4]:.2f} s)  heard {heard.text!r} (WER "
                  f"{word_error_rate(asked, heard.text):.2f})  first sentence {sentence!r}"
                  f"  reply {reply!r}", flush=True)
    med = [statistics.median(c) for c in zip(*rows, strict=True)]
    best = min(rows, key=lambda x: x[3])
    print(f"median of {len(rows)}: ASR {med[0]:.3f} s, first sentence +{med[1]:.3f} s, TTS "
          f"+{med[2]:.3f} s, first audio {med[3]:.3f} s (best {best[3]:.3f}, worst "
          f"{max(x[3] for x in rows):.3f}); goal <= 2.0 s")


def read_ct2(path: Path) -> dict:
    """The variables of a CTranslate2 model.bin (its `ModelSpec._serialize` layout) as arrays."""
    import struct

    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def text() -> str:
        nonlocal pos
        n = take("H")
        pos += n
        return data[pos - n:pos - 1].decode()

    take("I"), text(), take("I")  # binary version, spec name, revision
    dtypes = (np.float32, np.int8, np.int16, np.int32, np.float16)
    out = {}
    for _ in range(take("I")):
        name, rank = text(), take("B")
        shape = [take("I") for _ in range(rank)]
        dtype, nbytes = np.dtype(dtypes[take("B")]), take("I")
        out[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
        pos += nbytes
    return out


def ct2_to_ggml(folder: Path, out: Path) -> None:
    """A faster-whisper (CTranslate2, float16) Whisper folder -> whisper.cpp's ggml model file."""
    import json
    import struct

    import numpy as np
    from faster_whisper.feature_extractor import FeatureExtractor

    v = read_ct2(folder / "model.bin")
    for name, a in v.items():
        if a.ndim >= 2 and a.dtype != np.float16:
            raise SystemExit(f"{folder}: {name} is {a.dtype}; only float16 models convert as is")
    enc_layers = sum(k.endswith("self_attention/linear_1/weight") for k in v if
                     k.startswith("encoder/"))
    dec_layers = sum(k.endswith("attention/linear_2/weight") for k in v if
                     k.startswith("decoder/"))
    n_vocab, state = v["decoder/embeddings/weight"].shape
    tensors: dict[str, np.ndarray] = {
        "encoder.positional_embedding": v["encoder/position_encodings/encodings"],
        "encoder.conv1.weight": v["encoder/conv1/weight"],
        "encoder.conv1.bias": v["encoder/conv1/bias"].reshape(-1, 1),
        "encoder.conv2.weight": v["encoder/conv2/weight"],
        "encoder.conv2.bias": v["encoder/conv2/bias"].reshape(-1, 1),
        "encoder.ln_post.weight": v["encoder/layer_norm/gamma"],
        "encoder.ln_post.bias": v["encoder/layer_norm/beta"],
        "decoder.token_embedding.weight": v["decoder/embeddings/weight"],
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
        "decoder.ln.weight": v["decoder/layer_norm/gamma"],
        "decoder.ln.bias": v["decoder/layer_norm/beta"]}

    def linear(dst: str, src: str, rows: slice | None = None, bias: bool = True) -> None:
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        tensors[f"{dst}.weight"] = w if rows is None else w[rows]
        if bias:
            tensors[f"{dst}.bias"] = b if rows is None else b[rows]

    def attention(dst: str, src: str, fused: int, q: str | None = None) -> None:
        # CTranslate2 fuses q, k, v (self-attention) or k, v (cross-attention); key has no bias
        names = ["query", "key", "value"][-fused:]
        for i, name in enumerate(names):
            linear(f"{dst}.{name}", f"{src}/linear_{0 if q is None else 1}",
                   slice(i * state, (i + 1) * state), bias=name != "key")
        if q is not None:
            linear(f"{dst}.query", q)

    for side, n in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            tensors[f"{dst}.attn_ln.weight"] = v[f"{src}/self_attention/layer_norm/gamma"]
            tensors[f"{dst}.attn_ln.bias"] = v[f"{src}/self_attention/layer_norm/beta"]
            attention(f"{dst}.attn", f"{src}/self_attention", 3)
            linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            if side == "decoder":
                tensors[f"{dst}.cross_attn_ln.weight"] = v[f"{src}/attention/layer_norm/gamma"]
                tensors[f"{dst}.cross_attn_ln.bias"] = v[f"{src}/attention/layer_norm/beta"]
                attention(f"{dst}.cross_attn", f"{src}/attention", 2,
                          q=f"{src}/attention/linear_0")
                linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            tensors[f"{dst}.mlp_ln.weight"] = v[f"{src}/ffn/layer_norm/gamma"]
            tensors[f"{dst}.mlp_ln.bias"] = v[f"{src}/ffn/layer_norm/beta"]
            linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
    # the byte tokens below <|endoftext|>, by id (GPT-2's bytes-to-unicode mapping undone)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    eot = vocab["<|endoftext|>"]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            to_byte[chr(256 + extra)] = b
            extra += 1
    words = [b""] * eot
    for tok, i in vocab.items():
        if i < eot:
            words[i] = bytes(to_byte[c] for c in tok)
    filters = FeatureExtractor(feature_size=80).mel_filters.astype(np.float32)  # (80, 201)
    heads = int(v["encoder/num_heads"])
    with open(out, "wb") as f:
        f.write(struct.pack("i" * 12, 0x67676D6C, n_vocab, len(tensors["encoder.positional_"
                                                                        "embedding"]),
                            state, heads, enc_layers, len(tensors["decoder.positional_embedding"]),
                            state, int(v["decoder/num_heads"]), dec_layers, 80, 1))
        f.write(struct.pack("ii", *filters.shape) + filters.tobytes())
        f.write(struct.pack("i", len(words)))
        for w in words:
            f.write(struct.pack("i", len(w)) + w)
        for name, a in tensors.items():
            small = a.ndim < 2 or name.endswith(("conv1.bias", "conv2.bias", "positional_"
                                                                             "embedding"))
            a = np.ascontiguousarray(a, np.float32 if small else np.float16)
            key = name.encode()
            f.write(struct.pack("iii", a.ndim, len(key), 0 if small else 1))
            f.write(struct.pack(f"{a.ndim}i", *reversed(a.shape)) + key + a.tobytes())


def timed_transcriptions(clip: Path, model: str, args: argparse.Namespace,
                         **kw: object) -> tuple[list[float], object]:
    """One untimed warm-up, then `args.rounds` timed transcriptions of `clip`: (seconds, last)."""
    from llamaworks.voice.asr import transcribe

    transcribe(clip, model, threads=args.threads, progress=False, **kw)
    times, t = [], None
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        t = transcribe(clip, model, threads=args.threads, progress=False, **kw)
        times.append(time.perf_counter() - t0)
    assert t is not None
    return times, t


def whisper_cpp(args: argparse.Namespace) -> None:
    import re
    import subprocess

    from llamaworks.voice.asr import load_whisper, word_error_rate
    from llamaworks.voice.models import whisper_model_dir
    from llamaworks.voice.tts import speak_to_wav

    tmp = Path(tempfile.mkdtemp(prefix="bench-whisper-cpp-"))
    clip = tmp / "joe.wav"
    speak_to_wav(TEXT, clip, "joe")
    for model in ("base", "tiny.en"):
        ggml = tmp / f"ggml-{model}.bin"
        ct2_to_ggml(whisper_model_dir(model), ggml)
        load_whisper(model, args.threads)
        for vad in (False, True):
            times, t = timed_transcriptions(clip, model, args, language="en", vad=vad)
            print(f"faster-whisper {model:7s} vad {'on ' if vad else 'off'} audio "
                  f"{t.duration:5.1f} s  best {min(times):.3f} s (RTF "
                  f"{min(times) / t.duration:.3f}) median {statistics.median(times):.3f} s  "
                  f"WER {word_error_rate(TEXT, t.text):.3f}  {t.text!r}", flush=True)
        variants = [("f16", ggml)]
        quantize = Path(args.whisper_cpp).with_name("whisper-quantize")
        if quantize.is_file():  # q8_0: the nearest of whisper.cpp's types to CTranslate2's int8
            q8 = tmp / f"ggml-{model}-q8_0.bin"
            subprocess.run([str(quantize), str(ggml), str(q8), "q8_0"], capture_output=True,
                           check=True)
            variants.append(("q8_0", q8))
        for kind, path in variants:
            walls, own, loads, text = [], [], [], ""
            cmd = [args.whisper_cpp, "-m", str(path), "-f", str(clip), "-t", str(args.threads),
                   "-l", "en", "-bs", "5", "-bo", "5", "-nt"]
            for _ in range(args.rounds + 1):  # the first run warms the page cache
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                walls.append(time.perf_counter() - t0)
                total = float(re.search(r"total time =\s*([\d.]+) ms", r.stderr).group(1))
                load = float(re.search(r"load time =\s*([\d.]+) ms", r.stderr).group(1))
                own.append((total - load) / 1000)
                loads.append(load / 1000)
                text = " ".join(r.stdout.split())
            walls, own = walls[1:], own[1:]
            print(f"whisper-cli    {model:7s} {kind:5s} vad off audio {t.duration:5.1f} s  "
                  f"process best {min(walls):.3f} s median {statistics.median(walls):.3f} s; "
                  f"own report (total - load {statistics.median(loads[1:]):.3f} s) best "
                  f"{min(own):.3f} s (RTF {min(own) / t.duration:.3f}) median "
                  f"{statistics.median(own):.3f} s  WER {word_error_rate(TEXT, text):.3f}  "
                  f"{text!r}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turn", action="store_true", help="voice-turn latency instead of RTFs")
    ap.add_argument("--asr-model", default="tiny.en", help="with --turn: the Whisper model")
    ap.add_argument("--tools", default=None, help="with --turn: through the agent loop")
    ap.add_argument("--language", default=None, help="with --turn: the language Whisper hears "
                    "(default: English for tiny.en, detected for base)")
    ap.add_argument("--whisper-cpp", default=None, metavar="WHISPER_CLI",
                    help="compare ASR speed with this whisper.cpp whisper-cli build")
    args = ap.parse_args()
    if args.turn:
        turn_latency(args)
        return
    if args.whisper_cpp:
        whisper_cpp(args)
        return

    from llamaworks.voice.asr import load_whisper, word_error_rate
    from llamaworks.voice.tts import available_engines, speak_to_wav, synthesize

    tmp = Path(tempfile.mkdtemp(prefix="bench-voice-"))
    clips = {}
    for voice in available_engines():
        rtf, first = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            audio = 0.0
            for i, sp in enumerate(synthesize(TEXT, voice)):
                if i == 0:
                    first.append(time.perf_counter() - t0)
                audio += sp.seconds
            rtf.append((time.perf_counter() - t0) / audio)
        clips[voice] = tmp / f"{voice}.wav"
        speak_to_wav(TEXT, clips[voice], voice)
        print(f"synthesis {voice:7s} audio {audio:5.1f} s  RTF best {min(rtf):.3f} median "
              f"{statistics.median(rtf):.3f}  first sentence {min(first):.2f} s (median "
              f"{statistics.median(first):.2f})", flush=True)
    for model in ("base", "tiny.en"):
        load_whisper(model, args.threads)
        for voice, clip in clips.items():
            times, t = timed_transcriptions(clip, model, args)
            print(f"transcribe {model:7s} {voice:7s} audio {t.duration:5.1f} s  RTF best "
                  f"{min(times) / t.duration:.3f} median "
                  f"{statistics.median(times) / t.duration:.3f}  WER "
                  f"{word_error_rate(TEXT, t.text):.3f}  {t.text!r}", flush=True)


if __name__ == "__main__":
    main()
