"""`llamaworks transcribe`, `llamaworks speak`, and the voice side of `llamaworks chat`
(`--voice-in`, `--voice-out`, `--voice`, `--asr-model`, the REPL's `/voice FILE`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError


def cmd_transcribe(args: argparse.Namespace) -> int:
    from llamaworks.voice.asr import format_transcript, transcribe

    fmt = "json" if args.json else args.format
    t = transcribe(args.file, model=args.model, language=args.language, threads=args.threads,
                   vad=not args.no_vad)
    sys.stdout.write(format_transcript(t, fmt))
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    from llamaworks.voice.encode import format_for_path
    from llamaworks.voice.tts import speak_to_file

    if (args.text is None) == (args.file is None):
        raise LlamaworksError("pass exactly one of --text T or --file F")
    text = args.text
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            raise LlamaworksError(f"cannot read --file {args.file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise LlamaworksError(f"--file {args.file} is not UTF-8 text") from None
    if Path(args.out).is_dir():
        raise LlamaworksError(f"--out {args.out} is a directory; pass a .wav file name")
    fmt = format_for_path(args.out)  # an unknown ending or a missing encoder: before speaking
    n, seconds, rate = speak_to_file(text, args.out, args.voice, args.speed, fmt, args.variation)
    print(f"wrote {args.out} ({n} sentence{'s' * (n != 1)}, {seconds:.2f} s at {rate} Hz)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from llamaworks.voice.asr import DEFAULT_MODEL, FORMATS

    p = sub.add_parser("transcribe", help="speech to text (faster-whisper, offline)")
    p.add_argument("file", help="an audio file in any format ffmpeg reads (wav, mp3, ogg, ...)")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--language", default=None, help="language code (default: detected)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base (default, multilingual), tiny.en, or a faster-whisper folder")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--no-vad", action="store_true", help="no voice-activity filter")
    p.set_defaults(fn=cmd_transcribe)

    p = sub.add_parser("speak", help="text to speech, sentence by sentence, to an audio file")
    p.add_argument("--text", default=None, help="the text to speak")
    p.add_argument("--file", default=None, help="a UTF-8 text file to speak")
    p.add_argument("--out", required=True,
                   help="output file: .wav, .mp3, .flac, .opus (Ogg Opus; also .ogg) or .aac")
    p.add_argument("--voice", default=None,
                   help="joe (piper, default when installed), espeak or espeak:VOICE")
    p.add_argument("--speed", type=float, default=1.0, help="speaking rate, 0.25-4 (default 1)")
    p.add_argument("--variation", type=float, default=1.0,
                   help="piper's sampling noise, 0-1 (default 1, the voice as published; 0 "
                   "speaks the same text as the same audio every time)")
    p.set_defaults(fn=cmd_speak)


# -- chat --voice-in / --voice-out -----------------------------------------------------------------
def add_chat_voice_args(p: argparse.ArgumentParser) -> None:
    """The voice flags of `llamaworks chat`."""
    from llamaworks.voice.turn import TURN_ASR_MODEL

    p.add_argument("--voice-in", default=None, metavar="AUDIO",
                   help="answer what this audio file says (any format ffmpeg reads; heard by "
                   "Whisper) and exit; prints the transcript and the reply")
    p.add_argument("--voice-out", default=None, metavar="OUT",
                   help="with --voice-in or -p: speak the reply to this file (.wav, .mp3, "
                   ".flac, .opus, .aac), each sentence as soon as it is written")
    p.add_argument("--voice", default=None,
                   help="the voice of --voice-out: joe (piper, default when installed), espeak "
                   "or espeak:VOICE")
    p.add_argument("--voice-variation", type=float, default=1.0, metavar="V",
                   help="piper's sampling noise for --voice-out, 0-1 (default 1; 0: the same "
                   "reply is the same audio every time)")
    p.add_argument("--asr-model", default=TURN_ASR_MODEL,
                   help=f"the Whisper model hearing --voice-in and /voice (default "
                   f"{TURN_ASR_MODEL}: fastest, English; base for other languages)")


class ChatVoice:
    """The voice of one `chat` run. Everything that can fail before the model speaks is checked
    on construction, before the model loads: the flags go together, --voice-out names a format
    this machine writes, --voice-in decodes (the speech engine starts then too, warming up while
    the model loads). `once` runs the one reply of --voice-in / -p (printing it, speaking it to
    --voice-out as it comes); `hear_file` is the REPL's /voice."""

    def __init__(self, args: argparse.Namespace):
        from llamaworks.voice import asr, tts
        from llamaworks.voice.encode import SpeechFile

        self.args = args
        vin, vout = getattr(args, "voice_in", None), getattr(args, "voice_out", None)
        if vin is not None and args.prompt is not None:
            raise LlamaworksError("pass -p PROMPT or --voice-in AUDIO, not both")
        if vout is not None and vin is None and args.prompt is None:
            raise LlamaworksError("--voice-out speaks one reply: pass --voice-in AUDIO or "
                                  "-p PROMPT with it (in the REPL, /voice FILE is spoken input)")
        if getattr(args, "voice", None) is not None and vout is None:
            raise LlamaworksError("--voice is the voice of --voice-out: pass --voice-out OUT")
        self.asr_model = getattr(args, "asr_model", None) or "tiny.en"
        self.out = SpeechFile(vout, gap_s=tts.SENTENCE_GAP_S) if vout is not None else None
        self.samples = asr.load_audio(vin) if vin is not None else None
        self.engine = (tts.open_engine(args.voice, warm=True,
                                       variation=getattr(args, "voice_variation", 1.0))
                       if vout is not None else None)
        self.heard: str | None = None

    @property
    def once_requested(self) -> bool:
        return self.samples is not None or self.out is not None

    def hear_input(self) -> str:
        """The transcript of --voice-in (heard once)."""
        from llamaworks.voice.turn import hear

        if self.heard is None:
            self.heard = hear(self.samples, self.asr_model, threads=self.args.threads or 0,
                              name=self.args.voice_in).text
        return self.heard

    def hear_file(self, path: str) -> str:
        """/voice FILE: its transcript, printed as the user's line."""
        from llamaworks.voice.turn import hear

        text = hear(path, self.asr_model, threads=self.args.threads or 0).text
        print(f"you: {text}", flush=True)
        return text

    def once(self, reply: Callable[[str], Iterable[Any]]) -> int:
        """The one reply: `reply(user text)` is its stream (`voice.turn.Delta`s)."""
        from llamaworks.cli import _Thoughts
        from llamaworks.tools.chat import _show_step
        from llamaworks.voice.turn import speak_reply

        args = self.args
        text = self.hear_input() if self.samples is not None else args.prompt
        if self.samples is not None and not args.json:
            print(f"you: {text}", flush=True)
        shown = _Thoughts(None if args.json else sys.stdout, sys.stdout.isatty())
        first_audio = done = None
        with self.out if self.out is not None else nullcontext():
            for ev in speak_reply(reply(text), self.engine):
                if ev.kind == "text":
                    shown.write("", ev.text)
                elif ev.kind == "reasoning":
                    shown.write(ev.text, "")
                elif ev.kind == "tool" and not args.json:
                    _show_step({"type": "tool", **ev.data})
                elif ev.kind == "audio" and self.out is not None:
                    self.out.add(ev.speech.pcm, ev.speech.sample_rate)
                    first_audio = ev.at if first_audio is None else first_audio
                elif ev.kind == "done":
                    done = ev
            shown.close()
            if not args.json:
                sys.stdout.write("\n")
            if self.out is not None and not self.out.written:
                raise LlamaworksError(f"the reply has no words to speak; {self.out.path} was "
                                      "not written")
        assert done is not None
        result = done.data
        steps = getattr(result, "steps", [])
        if getattr(result, "finish_reason", "stop") != "stop" and not args.json:
            print(f"(stopped: {result.finish_reason})", file=sys.stderr)
        speech = None
        if self.out is not None:
            speech = {"path": str(self.out.path), "format": self.out.name,
                      "sentences": self.out.sentences, "seconds": round(self.out.seconds, 3),
                      "sample_rate": self.out.file_rate, "first_audio_s": round(first_audio, 3)}
            if not args.json:
                print(f"wrote {self.out.path} ({self.out.sentences} sentence"
                      f"{'s' * (self.out.sentences != 1)}, {self.out.seconds:.2f} s at "
                      f"{self.out.file_rate} Hz; first sentence spoken {first_audio:.2f} s after "
                      "the reply began)", file=sys.stderr)
        if args.json:
            answer = getattr(result, "answer", result if isinstance(result, str) else done.text)
            out: dict[str, Any] = {"answer": answer, "steps": steps}
            if self.samples is not None:
                out = {"transcript": text, **out}
            if speech is not None:
                out["speech"] = speech
            print(json.dumps(out, ensure_ascii=False))
        return 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> ChatVoice:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
