"""Our C++ CPU kernels: fused dequantize + matvec for GGUF-layout Q4_1 and Q8_0 weight blocks
(qmatmul.cpp, on blocks.h), and the fused decode step that runs every layer for one new token per
row in one call (decode.cpp; driven by `llamaworks.infer.fused`).

Three tiers of the same source, each built with its own compiler flags (never `-march=native`, so
a tier means the same code on every machine): `avx512` (x86-64-v4: AVX-512 F/BW/DQ/VL, plus
VNNI where the CPU has it), `avx2` (x86-64-v3: AVX2, FMA, F16C, plus AVX-VNNI where present) and
`scalar` (portable C++ the compiler vectorizes; the only tier on ARM). The best tier the CPU can
run is used; `LLAMAWORKS_ISA=avx512|avx2|scalar` forces one (a tier the CPU cannot run, or one
that fails to build, gives one warning and the next tier down runs). Each tier's library
registers its ops under its own namespace (`torch.ops.llamaworks_avx2.q4_1_linear`, ...), so tests
and benchmarks load several tiers side by side (`ops(tier)`).

Built on first use with `torch.utils.cpp_extension.load` into a cache folder keyed by the source,
the tier's flags, the CPU flags and the torch version, with the environment's own ninja; later
processes load the finished library without running ninja (`jit`). The linear ops have fake
(shape-only) implementations, so `torch.compile` treats them as opaque calls.

`preferred()` says whether callers should take our kernels over PyTorch's: measured per tier on
SmolLM2 (BENCHMARKS.md), ours are faster in every tier for Q4_1/Q8_0 (the portable tier's int4
decode beats PyTorch's packed int4 even with PyTorch on AVX-512) and the fused decode step is at
least as fast as the per-op forward; so it is True whenever a tier loaded. `load()` returns
False (with one warning) when no tier builds; callers then use PyTorch's kernels. Set
LLAMAWORKS_NO_KERNELS=1 to skip building them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamaworks.infer.kernels import jit

HERE = Path(__file__).parent
SOURCES = [HERE / "qmatmul.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "blocks.h", HERE / "matvec.h", HERE / "ggml_types.h"]
QK = 32  # weights per block
Q4_1_BYTES = 20  # per block: 16 bytes of nibbles, fp16 d, fp16 m
Q8_0_BYTES = 34  # per block: 32 int8, fp16 d
# A packed row holds its blocks' bytes regrouped, quants first: Q4_1 [nb * 16 nibble bytes | nb fp16
# d | nb fp16 m], Q8_0 [nb * 32 int8 | nb fp16 d], so the kernel reads long runs of each.

# GGUF types kept in the file's own blocks, run by the kernels of ggml_types.h (integer dots over
# the blocks; F16 a float dot): kind = 100 + the GGML type id.
GGML_KINDS = {"F16": 101, "Q4_0": 102, "Q5_0": 106, "Q5_1": 107, "Q4_K": 112, "Q5_K": 113,
              "Q6_K": 114}

TIERS = ("avx512", "avx2", "scalar")  # best first
# CPU flags (as /proc/cpuinfo names them) each tier's code needs.
_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma",
                     "f16c", "bmi2"},
          "avx2": {"avx2", "fma", "f16c", "bmi2", "movbe"},
          "scalar": set()}

_state: dict[str, Any] = {}  # "active": the tier in use (or None), "built": {tier: bool}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def host_tiers() -> list[str]:
    """The tiers this CPU can run, best first (`scalar` always)."""
    flags = set(_cpu_flags().split())
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [t for t in TIERS if t == "scalar" or x86 and _NEEDS[t] <= flags]


def _flags(tier: str) -> list[str]:
    cpu = set(_cpu_flags().split())
    if tier == "avx512":
        return ["-march=x86-64-v4"] + (["-mavx512vnni"] if "avx512_vnni" in cpu else [])
    if tier == "avx2":
        return ["-march=x86-64-v3"] + (["-mavxvnni"] if "avx_vnni" in cpu else [])
    return []


def build_dir(tier: str) -> Path:
    """Cache folder of the build of `tier` for this source, CPU and torch version."""
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(_flags(tier)).encode()
        + _cpu_flags().encode() + torch.__version__.encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("LLAMAWORKS_CACHE", Path.home() / ".cache" / "llamaworks"))
    return root / "kernels" / f"{tier}-{key}"


def _namespace(tier: str) -> str:
    return f"llamaworks_{tier}"


def _build(tier: str) -> None:
    ns = _namespace(tier)
    jit.load_library(f"llamaworks_kernels_{tier}", SOURCES, build_dir(tier),
                     ["-O3", "-fopenmp", f"-DLW_NAMESPACE={ns}", *_flags(tier)], ["-fopenmp"])

    @torch.library.register_fake(f"{ns}::q4_1_linear")
    def _q4_1_fake(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake(f"{ns}::rows_dot")
    def _rows_dot_fake(x: Tensor, w: Tensor, idx: Tensor, bits: int) -> Tensor:
        return x.new_empty(idx.shape, dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::q8_0_linear")
    def _q8_0_fake(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake(f"{ns}::gguf_linear")
    def _gguf_fake(x: Tensor, w: Tensor, kind: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))


def build(tier: str) -> bool:
    """Build (once per process; cached on disk) and register `tier`'s library. True if usable;
    a failed build warns once, naming the tier."""
    built = _state.setdefault("built", {})
    if tier not in built:
        if tier not in host_tiers():
            built[tier] = False
            return False
        try:
            _build(tier)
            built[tier] = True
        except Exception as e:  # noqa: BLE001 - any build failure means: try the next tier
            warnings.warn(f"could not build llamaworks' {tier} CPU kernels ({type(e).__name__}: "
                          f"{e}); trying the next tier.",
                          RuntimeWarning, stacklevel=2)
            built[tier] = False
    return built[tier]


def requested() -> str | None:
    """The tier LLAMAWORKS_ISA forces, or None."""
    want = os.environ.get("LLAMAWORKS_ISA", "").strip().lower()
    if not want:
        return None
    if want not in TIERS:
        raise ValueError(f"LLAMAWORKS_ISA={want!r}: choose one of {', '.join(TIERS)}")
    return want


def _choose() -> str | None:
    want = requested()
    candidates = host_tiers()
    if want is not None:
        if want not in candidates:
            warnings.warn(f"LLAMAWORKS_ISA={want}: this CPU cannot run the {want} kernels "
                          f"(it has {', '.join(candidates)}); using the next tier down",
                          RuntimeWarning, stacklevel=3)
        candidates = [t for t in candidates if TIERS.index(t) >= TIERS.index(want)]
    for t in candidates:
        if build(t):
            return t
    return None


def load() -> bool:
    """Build and register the active tier's kernels (once per process). True if usable."""
    if "active" not in _state:
        if os.environ.get("LLAMAWORKS_NO_KERNELS"):
            _state["active"] = None
        else:
            _state["active"] = _choose()
            if _state["active"] is None:
                warnings.warn("no llamaworks CPU kernel tier could be built; decoding runs the "
                              "per-op forward and int8/int4 use PyTorch's kernels",
                              RuntimeWarning, stacklevel=2)
    return _state["active"] is not None


def tier() -> str | None:
    """The tier in use (after `load()`), or None when no kernels are in use."""
    return _state.get("active") if load() else None


def preferred() -> bool:
    """Whether our kernels should be used by default over PyTorch's (the one place that choice is
    made; see the module docstring for the measurements behind it)."""
    return tier() is not None


@contextmanager
def _active(name: str | None) -> Iterator[None]:
    load()
    saved = _state.get("active")
    _state["active"] = name
    try:
        yield
    finally:
        _state["active"] = saved


def disabled() -> AbstractContextManager[None]:
    """Inside this block `load()` reports False, so quantized layers built here use PyTorch's
    kernels (for benchmarks and comparisons); layers built before or after are unaffected."""
    return _active(None)


def using(name: str) -> AbstractContextManager[None]:
    """Inside this block `name` is the active tier (built first; ValueError if it cannot be), so
    layers and decode steps built here run it (tests and benchmarks of every tier)."""
    if not build(name):
        raise ValueError(f"the {name} kernels cannot run or be built on this machine")
    return _active(name)


def ops(name: str | None = None) -> Any:
    """The op namespace of tier `name` (default: the active tier)."""
    name = name or tier()
    if name is None or not build(name):
        raise RuntimeError("llamaworks kernels are not available")
    return getattr(torch.ops, _namespace(name))


def isa(name: str | None = None) -> str:
    """The instruction set a tier's build targets: avx512vnni, avx512, avx2vnni, avx2 or
    scalar."""
    return ops(name).isa()


def q4_1_linear(x: Tensor, w: Tensor, tier: str | None = None) -> Tensor:
    """x [..., K] @ W.T, W packed Q4_1 rows uint8 [N, K / 32 * 20] -> [..., N], x's dtype."""
    return ops(tier).q4_1_linear(x, w)


def q8_0_linear(x: Tensor, w: Tensor, tier: str | None = None) -> Tensor:
    """x [..., K] @ W.T, W packed Q8_0 rows uint8 [N, K / 32 * 34] -> [..., N], x's dtype."""
    return ops(tier).q8_0_linear(x, w)


def gguf_linear(x: Tensor, w: Tensor, kind: int, tier: str | None = None) -> Tensor:
    """x [..., K] @ W.T for W in a GGUF type's own block rows uint8 [N, bytes] (`GGML_KINDS`)."""
    return ops(tier).gguf_linear(x, w, kind)


def dequant_rows(w: Tensor, kind: int, k: int, tier: str | None = None) -> Tensor:
    """GGUF block rows uint8 [N, bytes] of `kind` -> float32 weights [N, k] (gguf-py's values)."""
    return ops(tier).dequant_rows(w, kind, k)


def dequant_rows_bf16(w: Tensor, kind: int, k: int, tier: str | None = None) -> Tensor:
    """`dequant_rows` rounded to bfloat16 (to nearest even, as `Tensor.to`), in one pass."""
    return ops(tier).dequant_rows_bf16(w, kind, k)


def q8_quantize(x: Tensor, block: int, tier: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The int8 activations the GGUF-type kernels dot against, of x [R, K]: per block of 256 (the
    K-quants Q4_K / Q5_K / Q6_K, with sums per 16) or of 32 (Q4_0 / Q5_0 / Q5_1, sums per block):
    q int8 [R, K], scales d float32 [R, K / block] (x ~ q * d), sums of q int16."""
    return ops(tier).q8_quantize(x, block)


def rows_dot(x: Tensor, w: Tensor, idx: Tensor, bits: int, tier: str | None = None) -> Tensor:
    """Exact float32 dots of x [..., K] with the packed rows idx [..., k] (Q4_1 if bits == 4, Q8_0
    if 8): [..., k] float32. For re-checking a few logits without activation rounding."""
    return ops(tier).rows_dot(x, w, idx, bits)


# -- packing to and from the row formats (float32 math, fp16 scales as in GGUF) ------------------
def _fp16_bytes(v: Tensor) -> Tensor:
    """[N, nb] floats -> [N, nb * 2] bytes of their fp16 values."""
    return v.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_from(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def pack_q4_1_blocks(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Quants q [N, nb, 32] (0..15), fp16-representable d, m [N, nb] -> packed rows [N, nb * 20]."""
    n, nb, _ = q.shape
    q = q.to(torch.uint8)
    nib = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, nb * 16)
    return torch.cat([nib, _fp16_bytes(d), _fp16_bytes(m)], -1).contiguous()


def pack_q4_1(w: Tensor) -> Tensor:
    """float weights [N, K] -> packed Q4_1 rows [N, K / 32 * 20]: per block d = (max - min) / 15,
    m = min, q = round((w - m) / d) (llama.cpp's quantize_row_q4_1; on weights dequantized from
    Q4_1 it recovers the original blocks)."""
    n, k = w.shape
    if k % QK:
        raise ValueError(f"Q4_1 needs an input size divisible by {QK}; got {k}")
    wb = w.detach().float().reshape(n, k // QK, QK)
    lo, hi = wb.amin(-1), wb.amax(-1)
    d = ((hi - lo) / 15).to(torch.float16).float()
    m = lo.to(torch.float16).float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((wb - m[..., None]) * inv[..., None]).round().clamp(0, 15)
    return pack_q4_1_blocks(q, d, m)


def pack_q8_0_blocks(q: Tensor, d: Tensor) -> Tensor:
    """Quants q [N, nb, 32] (int8 range), fp16-representable d [N, nb] -> packed rows."""
    n, nb, _ = q.shape
    qb = q.to(torch.int8).view(torch.uint8).reshape(n, nb * QK)
    return torch.cat([qb, _fp16_bytes(d)], -1).contiguous()


def pack_q8_0(w: Tensor) -> Tensor:
    """float weights [N, K] -> packed Q8_0 rows [N, K / 32 * 34]: d = amax / 127, q = round(w / d)
    (llama.cpp's quantize_row_q8_0)."""
    n, k = w.shape
    if k % QK:
        raise ValueError(f"Q8_0 needs an input size divisible by {QK}; got {k}")
    wb = w.detach().float().reshape(n, k // QK, QK)
    d = (wb.abs().amax(-1) / 127).to(torch.float16).float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (wb * inv[..., None]).round().clamp(-127, 127)
    return pack_q8_0_blocks(q, d)


def unpack_q4_1(rows: Tensor, idx: Tensor | None = None) -> Tensor:
    """Packed Q4_1 rows [N, bytes] (or the rows `idx`) -> float32 weights [..., K]."""
    r = rows if idx is None else rows[idx]
    nb = r.shape[-1] // Q4_1_BYTES
    nib = r[..., : nb * 16].unflatten(-1, (nb, 16))
    d = _fp16_from(r[..., nb * 16: nb * 18])
    m = _fp16_from(r[..., nb * 18:])
    q = torch.cat([nib & 0x0F, nib >> 4], -1).float()
    return (q * d[..., None] + m[..., None]).flatten(-2)


def unpack_q8_0(rows: Tensor, idx: Tensor | None = None) -> Tensor:
    """Packed Q8_0 rows [N, bytes] (or the rows `idx`) -> float32 weights [..., K]."""
    r = rows if idx is None else rows[idx]
    nb = r.shape[-1] // Q8_0_BYTES
    q = r[..., : nb * QK].contiguous().view(torch.int8).float().unflatten(-1, (nb, QK))
    d = _fp16_from(r[..., nb * QK:])
    return (q * d[..., None]).flatten(-2)
