#!/usr/bin/env bash
# The "every CPU" benchmark matrix: each GGUF given (default: the random-weight shapes that
# bench/make_gguf.py wrote to .cache/bench-gguf, and SmolLM2) on each kernel tier this CPU runs,
# ours (the file as stored) against llama.cpp in one bench/decode.py run per file and tier:
# decode (interleaved rounds), prefill (512 tokens) and model memory. The avx2 tier runs against a
# llama.cpp without AVX-512 (the library `make bench-avx2` builds) with PyTorch held to AVX2 too, as
# an AVX2-only CPU would run both. Logs go to $OUT (default .cache/acceptance), one per run.
#
#   bash bench/acceptance.sh [FILE.gguf ...]        # TIERS="avx512 avx2" ROUNDS=3 NEW=64
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-.cache/acceptance}
ROUNDS=${ROUNDS:-3}
NEW=${NEW:-64}
TIERS=${TIERS:-$($PY -c "from llamaworks.infer import kernels; print(' '.join(t for t in kernels.host_tiers() if t != 'scalar'))")}
AVX2_LIB=.cache/llama_cpp_avx2
mkdir -p "$OUT"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=($(ls .cache/bench-gguf/*.gguf 2>/dev/null | grep -v F16) \
         "$($PY -c 'from llamaworks.checkpoint.discovery import default_model_path as d; print(d())')")
fi
for f in "${files[@]}"; do
  for t in $TIERS; do
    env=(LLAMAWORKS_ISA="$t")
    if [ "$t" = avx2 ]; then
      [ -e "$AVX2_LIB/libllama.so" ] || $PY tools/llama_cpp_wheel.py --version 0.3.36 \
        --cache .cache --user-cache "$HOME/.cache/llamaworks" --avx2-lib "$AVX2_LIB"
      env+=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 LLAMA_CPP_LIB_PATH="$PWD/$AVX2_LIB")
    fi
    log="$OUT/$(basename "$f" .gguf)-$t.log"
    echo "== $f [$t] -> $log (load average $(cut -d' ' -f1 /proc/loadavg))"
    env "${env[@]}" $PY bench/decode.py --model "$f" --quants '' --tier-quants '' --eager '' \
      --compile '' --torch-kernels '' --skip hf,batch --tiers "$t" --rounds "$ROUNDS" \
      --new-tokens "$NEW" > "$log" 2>&1 || echo "   failed: see $log"
    grep -E "^median|^\| llamaworks as stored|^\| llama.cpp" "$log" || true
  done
done
