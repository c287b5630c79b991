"""HF safetensors for inference as stored (`infer.load.load_hf_as_stored`): read tensor by tensor,
bf16 projection matrices kept in bf16 (`BF16Linear`), everything else float32. Checked against
transformers on random tiny checkpoints it saved itself in bf16 (sharded, Qwen2 with q/k/v
biases and Llama), the fused decode step's logits against transformers' float32 forward of the
same bf16 weights, and bad files refused with the tensor named."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import hf_family_model
from infer_fixtures import ByteTokenizer
from torch import nn

transformers = pytest.importorskip("transformers")

from llamaworks import LLM, SamplingParams  # noqa: E402
from llamaworks.errors import CheckpointError  # noqa: E402
from llamaworks.infer.load import load_as_stored, load_for_use  # noqa: E402
from llamaworks.infer.quantize import BF16Linear  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
CASES = {"qwen2-bias": "Qwen2Config", "llama": "LlamaConfig"}


@pytest.fixture(scope="module", params=list(CASES))
def bf16_dir(request, tmp_path_factory):
    """(directory transformers saved in bf16 over three shards, transformers' float32 model of
    those same bf16 weights)."""
    hf = hf_family_model(CASES[request.param], BASE).to(torch.bfloat16)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, max_shard_size="60KB")
    assert len(list(d.glob("*.safetensors"))) >= 3
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return d, ref


def test_bf16_matrices_stay_bf16_and_nothing_else_is_lost(bf16_dir):
    d, ref = bf16_dir
    model = load_as_stored(d).model
    proj = [m for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))]
    assert len(proj) == 3 * 7 + 1 and all(isinstance(m, BF16Linear) for m in proj)
    assert not any(type(m) is nn.Linear for m in model.modules())
    want = dict(ref.named_parameters())
    for name, m in model.named_modules():
        if isinstance(m, BF16Linear):
            assert m.weight.dtype == torch.bfloat16
            assert torch.equal(m.weight.float(), want[name + ".weight"])
            if name + ".bias" in want:
                assert torch.equal(m.bias, want[name + ".bias"])
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, want["model.embed_tokens.weight"])
    bf16_bytes = sum(m.weight.numel() * 2 for m in proj)
    floats = sum(p.numel() for n, p in want.items() if not n.endswith(("_proj.weight",
                                                                       "lm_head.weight")))
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held == bf16_bytes + 4 * floats  # matrices at 2 bytes, the rest at 4: no copies


def test_fused_decode_of_bf16_weights_equals_transformers_float32(bf16_dir):
    """bf16 weights times float32 activations, accumulated in float32 (the fused step): each
    decode step's logits equal transformers' float32 forward over the same bf16 weights."""
    d, ref = bf16_dir
    llm = LLM(load_for_use(d), ByteTokenizer())
    assert llm.step.kind == "fused"
    prompt = [5, 17, 33, 2, 60, 41, 9]
    out = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0))[0]
    ids = out.token_ids
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    assert ids == want


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_family_model("LlamaConfig", BASE).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape"):
        load_as_stored(tmp_path)
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_as_stored(tmp_path)
