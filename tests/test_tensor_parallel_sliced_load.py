"""Tensor-parallel ranks read only their share (`train.tensor_parallel.load_split` through
`checkpoint.hf.iter_tensors(part=)`), on 2 gloo ranks under the real torchrun: on random tiny
checkpoints saved by transformers (one bf16 safetensors file; Qwen2 with q/k/v biases and tied
embeddings in shards), the sliced load gives the whole load's DTensors (placements and local
values), greedy tokens and logits; a spy on `safetensors.safe_open` shows every split matrix
read as one half of its rows or columns, never whole; for a 203 MB float32 model each rank's
peak anonymous memory during the load is about its half (stored in bf16: the whole load's is
the whole float32 model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# `SCRIPT OUT DIR...` under torchrun: each directory loaded whole-then-split and sliced (in this
# order, on one mesh), then 16 greedy tokens decoded on each; what was read
# from the safetensors files is recorded by a spy around safe_open.
SCRIPT = textwrap.dedent('''
    import sys
    import types
    import safetensors
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from llamaworks.infer import tensor_parallel as T
    from llamaworks.train import tensor_parallel as TP
    from llamaworks.infer.engine import Engine
    from llamaworks.infer.generate import generate_tokens
    from llamaworks.infer.sampling import SamplingParams

    reads = []
    real = safetensors.safe_open

    class Slice:
        def __init__(self, key, s):
            self.key, self.s = key, s
        def get_shape(self):
            return self.s.get_shape()
        def __getitem__(self, idx):
            t = self.s[idx]
            reads.append((self.key, "part", list(self.s.get_shape()), list(t.shape)))
            return t

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)
        def __enter__(self):
            self.f.__enter__()
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)
        def keys(self):
            return self.f.keys()
        def get_slice(self, key):
            return Slice(key, self.f.get_slice(key))
        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            reads.append((key, "whole", list(t.shape), list(t.shape)))
            return t

    safetensors.safe_open = Spy
    out, dirs = sys.argv[1], sys.argv[2:]
    result = {}
    mesh = TP.inference_mesh(2, torch.device("cpu"))  # one process group for all the loads
    rank, agree = dist.get_rank(), T.RankZeroTokens(torch.device("cpu"))
    for d in dirs:
        for sliced in (False, True):
            reads.clear()
            logits = []

            class Recording(Engine):
                def _append(self, s, t, lg):
                    logits.append(lg.float().clone())
                    super()._append(s, t, lg)

            model = TP.load_split(d, mesh) if sliced else T.load_float(d)
            TP.shard_for_inference(model, mesh)
            params = {n: (str(p.placements), p.to_local().detach().clone())
                      if isinstance(p, DTensor) else ("plain", p.detach().clone())
                      for n, p in model.named_parameters()}
            eng = Recording(model, types.SimpleNamespace(stop_ids=[]), max_batch=1,
                            agree=agree)
            ids = list(generate_tokens(eng, [5, 17, 3, 99, 42], 16,
                                       SamplingParams(temperature=0, ignore_eos=True)))
            shared = [n for n, p in model.named_parameters() if isinstance(p, DTensor)
                      and p.to_local().untyped_storage().nbytes() != p.to_local().nbytes]
            result[(d, sliced)] = {"ids": ids, "logits": torch.stack(logits),
                                   "params": params, "reads": list(reads), "shared": shared}
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()
''')

# `MEM OUT WARM DIR SLICED` under torchrun: after loading the tiny WARM the same way, this
# rank's peak anonymous memory (RssAnon sampled every millisecond by a thread) and peak resident
# set (VmHWM) while DIR's split model is loaded (whole then split, or sliced), less their values
# before.
MEM = textwrap.dedent('''
    import json
    import sys
    import threading
    import torch
    import torch.distributed as dist
    from llamaworks.infer import tensor_parallel as T
    from llamaworks.train import tensor_parallel as TP

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    out, warm, d, sliced = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    mesh = TP.inference_mesh(2, torch.device("cpu"))

    def load(path):
        model = TP.load_split(path, mesh) if sliced else T.load_float(path)
        TP.shard_for_inference(model, mesh)
        return model

    load(warm)  # one-time costs (imports, DTensor's first dispatches) before the baseline
    base_anon, base_hwm = status("RssAnon"), status("VmHWM")
    peak = [base_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon"))
            done.wait(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    model = load(d)
    done.set()
    thread.join()
    peak[0] = max(peak[0], status("RssAnon"))
    kept = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes
               for p in model.parameters())
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump({"anon": peak[0] - base_anon, "hwm": status("VmHWM") - base_hwm,
                   "kept": kept}, f)
    dist.destroy_process_group()
''')


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", *args], capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _llama(folder, dtype=torch.bfloat16, **shape):
    """A random Llama saved by transformers as one safetensors file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "tie_word_embeddings": False, "initializer_range": 0.2, **shape})
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    return folder


def _qwen2_sharded(folder):
    """A random Qwen2 (q/k/v biases, tied embeddings) saved by transformers in shards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.2)
    Qwen2ForCausalLM(cfg).save_pretrained(folder, max_shard_size="40KB")
    return folder


SPLIT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0,
         "down_proj": 1}


def _split_dim(key: str) -> int | None:
    """The dimension a rank reads half of (the plan), None for a tensor read whole."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-2] not in SPLIT:
        return None
    if parts[-1] == "bias":
        return 0 if SPLIT[parts[-2]] == 0 else None
    return SPLIT[parts[-2]]


@pytest.mark.slow
def test_sliced_load_gives_the_whole_loads_split_model_reading_only_each_ranks_share(
        tmp_path):
    single = _llama(tmp_path / "llama")
    sharded = _qwen2_sharded(tmp_path / "qwen2")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    _torchrun([str(script), str(tmp_path / "out"), str(single), str(sharded)])
    for rank in range(2):
        res = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        for d in (single, sharded):
            whole, sliced = res[(str(d), False)], res[(str(d), True)]
            assert len(sliced["ids"]) == 16
            assert sliced["ids"] == whole["ids"]
            diff = float((sliced["logits"] - whole["logits"]).abs().max())
            assert diff < 1e-5, diff
            assert sliced["params"].keys() == whole["params"].keys()
            for n, (placement, t) in whole["params"].items():
                got_placement, got = sliced["params"][n]
                assert got_placement == placement, n
                assert torch.equal(got, t), n
            assert sliced["shared"] == [] == whole["shared"]  # each share in its own storage
            split = [n for n, (p, _) in whole["params"].items() if "Shard" in p]
            assert len(split) == 2 * 7 + (2 * 3 if d == sharded else 0)  # + q/k/v biases
            # the whole load read every tensor whole; the sliced one each split tensor's half
            assert all(how == "whole" for _, how, _, _ in whole["reads"])
            assert {k for k, *_ in sliced["reads"]} == {k for k, *_ in whole["reads"]}
            assert len(sliced["reads"]) == len(whole["reads"])
            for key, how, shape, got_shape in sliced["reads"]:
                dim = _split_dim(key)
                if dim is None:
                    assert got_shape == shape, key
                    continue
                assert how == "part", key
                want = list(shape)
                want[dim] //= 2
                assert got_shape == want, key
            full = sum(torch.Size(s).numel() for _, _, s, _ in whole["reads"])
            read = sum(torch.Size(s).numel() for _, _, _, s in sliced["reads"])
            assert read < 0.75 * full, (read, full)
            print(f"rank {rank} {d.name}: logits max diff {diff:.1e}, read {read} of {full} "
                  "elements")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_ranks_peak_memory_while_loading_is_its_share(tmp_path, dtype):
    """A 203 MB float32 model (4 layers, dim 1024, MLP 3072), stored in bf16 (102 MB, widened
    on load: read whole, every rank holds the whole float32 model) or float32 (203 MB: read
    whole, the full copy is the mapped file's pages, anonymous memory holds the share)."""
    big = _llama(tmp_path / "big", dtype=dtype, vocab_size=256, hidden_size=1024,
                 intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4)
    size = (big / "model.safetensors").stat().st_size
    model_bytes = size * 4 // dtype.itemsize  # the float32 model
    assert model_bytes > 200e6
    warm = _llama(tmp_path / "warm", dtype=dtype)
    script = tmp_path / "mem.py"
    script.write_text(MEM)
    got = {}
    for sliced in ("0", "1"):
        _torchrun([str(script), str(tmp_path / f"mem{sliced}"), str(warm), str(big), sliced])
        got[sliced] = [json.loads((tmp_path / f"mem{sliced}.{r}").read_text())
                       for r in range(2)]

    def show(rows: list[dict]) -> str:
        return ", ".join(f"anon {g['anon'] / 1e6:.0f} hwm {g['hwm'] / 1e6:.0f} kept "
                         f"{g['kept'] / 1e6:.0f}" for g in rows)

    print(f"{dtype} file {size / 1e6:.0f} MB, float32 model {model_bytes / 1e6:.0f} MB; per "
          f"rank (MB) whole: {show(got['0'])}; sliced: {show(got['1'])}")
    for whole, sliced in zip(got["0"], got["1"], strict=True):
        assert whole["kept"] == sliced["kept"] < 0.55 * model_bytes  # the same share kept
        assert sliced["anon"] < 0.6 * model_bytes  # never much more than its half
        if dtype == torch.bfloat16:
            assert whole["anon"] > 0.9 * model_bytes  # the whole float32 model was here
