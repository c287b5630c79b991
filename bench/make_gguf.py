"""Random-weight GGUFs of real model shapes, quantized by llama.cpp's own quantizer.

For measuring at size without downloading anything: `--shape` is one of our presets
(llama3.2-1b, llama3.2-3b, llama3-8b, ...), the vocabulary is Llama 3's (llama.cpp's
`ggml-vocab-llama-bpe.gguf`, extracted by `make test` into .cache/vocab). The F16 file is written
one tensor at a time (weights drawn per tensor from a seeded generator, never the whole model in
memory), then each `--types` entry is made from it with `llama_cpp.llama_model_quantize`.
Existing outputs are kept (delete them to rebuild). Prints the paths.

    .venv/bin/python bench/make_gguf.py --shape llama3.2-1b --types Q4_K_M,Q4_0,Q8_0 --out DIR
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / ".cache" / "vocab" / "ggml-vocab-llama-bpe.gguf"


class RandomWeights(Mapping):
    """A state dict whose tensors are made when read: N(0, 0.02) matrices, unit norms, each
    from a generator seeded by the tensor's name (the same tensor every time it is read)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes, self.seed = shapes, seed

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape)
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(shape, generator=g) * 0.02

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def write_f16(shape: str, out: Path) -> Path:
    from llamaworks.checkpoint.gguf import read_metadata
    from llamaworks.checkpoint.gguf_export import export_gguf
    from llamaworks.checkpoint.shapes import expected_shapes
    from llamaworks.config import get_preset

    cfg = get_preset(shape)
    if not VOCAB.exists():
        raise SystemExit(f"{VOCAB} is missing: run `make test` once (it extracts the vocab)")
    tok = {k: v for k, v in read_metadata(VOCAB).items() if k.startswith("tokenizer.")}
    if len(tok["tokenizer.ggml.tokens"]) != cfg.vocab_size:
        raise SystemExit(f"{shape} has vocab {cfg.vocab_size}, Llama 3's has "
                         f"{len(tok['tokenizer.ggml.tokens'])}: pick a Llama-3 shape")
    path = out / f"{shape}-F16.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        export_gguf(path, cfg, RandomWeights(expected_shapes(cfg)), tok, "F16")
        print(f"# wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def quantize(src: Path, ftype: str) -> Path:
    import llama_cpp

    path = src.with_name(src.name.replace("-F16", f"-{ftype}"))
    if not path.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        tmp = path.with_suffix(".tmp")
        t0 = time.perf_counter()
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                          ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")
        tmp.replace(path)
        print(f"# quantized {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--types", default="Q4_K_M,Q4_0,Q8_0")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench-gguf")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    f16 = write_f16(a.shape, a.out)
    for t in [t for t in a.types.split(",") if t]:
        print(quantize(f16, t))


if __name__ == "__main__":
    main()
