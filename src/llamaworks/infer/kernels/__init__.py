"""Our C++ CPU kernels: fused dequantize + matvec for GGUF-layout Q4_1 and Q8_0 weight blocks
(qmatmul.cpp, on blocks.h), and the fused decode step that runs every layer for one new token per
row in one call (decode.cpp; driven by `llamaworks.infer.fused`).

Built on first use with `torch.utils.cpp_extension.load` (gcc, `-O3 -march=native`: AVX-512BW code,
with VNNI where the CPU has it, else portable scalar code; `isa()` says which) into a cache folder
keyed by the source, the CPU flags and the torch version, so a cached build never runs on a CPU it
was not built for. Registered as torch custom ops (`torch.ops.llamaworks.q4_1_linear`,
`q8_0_linear`, `rows_dot`, `decode_layers`); the linear ones have fake (shape-only)
implementations, so `torch.compile` treats them as opaque calls.

`load()` returns False (with one warning) when the build fails; callers then use PyTorch's kernels.
Set LLAMAWORKS_NO_KERNELS=1 to skip building them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).parent
SOURCES = [HERE / "qmatmul.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "blocks.h", HERE / "matvec.h"]
QK = 32  # weights per block
Q4_1_BYTES = 20  # per block: 16 bytes of nibbles, fp16 d, fp16 m
Q8_0_BYTES = 34  # per block: 32 int8, fp16 d
# A packed row holds its blocks' bytes regrouped, quants first: Q4_1 [nb * 16 nibble bytes | nb fp16
# d | nb fp16 m], Q8_0 [nb * 32 int8 | nb fp16 d], so the kernel reads long runs of each.

_state: dict[str, bool] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Cache folder of the build for this source, CPU and torch version."""
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + _cpu_flags().encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("LLAMAWORKS_CACHE", Path.home() / ".cache" / "llamaworks"))
    return root / "kernels" / key


def _build() -> None:
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="llamaworks_qmatmul", sources=[str(p) for p in SOURCES], build_directory=str(folder),
        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        is_python_module=False, verbose=False)

    @torch.library.register_fake("llamaworks::q4_1_linear")
    def _q4_1_fake(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamaworks::rows_dot")
    def _rows_dot_fake(x: Tensor, w: Tensor, idx: Tensor, bits: int) -> Tensor:
        return x.new_empty(idx.shape, dtype=torch.float32)

    @torch.library.register_fake("llamaworks::q8_0_linear")
    def _q8_0_fake(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))


def load() -> bool:
    """Build (once per process; cached on disk) and register the kernels. True if usable."""
    if "ok" not in _state:
        if os.environ.get("LLAMAWORKS_NO_KERNELS"):
            _state["ok"] = False
        else:
            try:
                _build()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any build failure means: use PyTorch's path
                warnings.warn(f"could not build llamaworks' CPU kernels ({type(e).__name__}: "
                              f"{e}); decoding runs the per-op forward and int8/int4 use "
                              "PyTorch's slower kernels. Install gcc and ninja to get them.",
                              RuntimeWarning, stacklevel=2)
                _state["ok"] = False
    return _state["ok"]


@contextmanager
def disabled() -> Iterator[None]:
    """Inside this block `load()` reports False, so quantized layers built here use PyTorch's
    kernels (for benchmarks and comparisons); layers built before or after are unaffected."""
    saved = dict(_state)
    _state["ok"] = False
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def isa() -> str:
    """The instruction set the kernels were built for: avx512vnni, avx2 or scalar."""
    if not load():
        raise RuntimeError("llamaworks kernels are not available")
    return torch.ops.llamaworks.isa()


def q4_1_linear(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ W.T, W packed Q4_1 rows uint8 [N, K / 32 * 20] -> [..., N], x's dtype."""
    return torch.ops.llamaworks.q4_1_linear(x, w)


def q8_0_linear(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ W.T, W packed Q8_0 rows uint8 [N, K / 32 * 34] -> [..., N], x's dtype."""
    return torch.ops.llamaworks.q8_0_linear(x, w)


def rows_dot(x: Tensor, w: Tensor, idx: Tensor, bits: int) -> Tensor:
    """Exact float32 dots of x [..., K] with the packed rows idx [..., k] (Q4_1 if bits == 4, Q8_0
    if 8): [..., k] float32. For re-checking a few logits without activation rounding."""
    return torch.ops.llamaworks.rows_dot(x, w, idx, bits)


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
