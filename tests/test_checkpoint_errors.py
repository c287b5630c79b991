"""Every way a checkpoint can be broken raises `CheckpointError` (or `ModelNotFoundError` for a
missing path) with a message naming the file and what is wrong; none crashes with a bare
traceback, and a pickle carrying code is refused without running it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamaworks.checkpoint import detect_format, load_model, save_native
from llamaworks.checkpoint.gguf import parse_gguf
from llamaworks.checkpoint.gguf_export import export_gguf
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError, ModelNotFoundError
from llamaworks.model import Llama

CFG = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                  max_seq_len=32)


def tiny_state_dict() -> dict[str, torch.Tensor]:
    model = Llama(CFG, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.state_dict()


def fails(path: Path, *fragments: str, error: type[Exception] = CheckpointError) -> str:
    """Load `path`; the error must name it and contain every fragment. Returns the message."""
    with pytest.raises(error) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("base")
    sd = tiny_state_dict()
    return {"gguf": export_gguf(d / "tiny.gguf", CFG, sd, None, "F32"),
            "hf": save_native(d / "hf", CFG, sd),
            "hf_sharded": save_native(d / "hf_sharded", CFG, sd, max_shard_bytes=30_000)}


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


# -- GGUF --------------------------------------------------------------------------------------
def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None, drop_keys=(),
                 drop_tensors=(), retype: dict | None = None, replace: dict | None = None
                 ) -> Path:
    """Copy an F32 GGUF with changes: another architecture, keys or tensors dropped, tensors
    re-encoded (`retype`: name -> GGML type or raw bytes) or replaced (`replace`: name -> array,
    which may add a tensor)."""
    f = parse_gguf(src)
    w = gguf.GGUFWriter(dst, arch=arch or f.metadata["general.architecture"])
    for k, v in f.metadata.items():
        if k != "general.architecture" and k not in drop_keys:
            vtype, sub = f.value_types[k]
            w.add_key_value(k, v, gguf.GGUFValueType(vtype),
                            None if sub is None else gguf.GGUFValueType(sub))
    arrays = {t.name: f.data(t).view(np.float32).reshape(t.shape) for t in f.tensors}
    arrays.update(replace or {})
    for name, arr in arrays.items():
        if name in drop_tensors:
            continue
        kind = (retype or {}).get(name)
        if kind is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif isinstance(kind, tuple):  # (type, raw bytes)
            w.add_tensor(name, kind[1], raw_dtype=kind[0])
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_base_file_loads(base):
    assert load_model(base["gguf"]).config.hidden_dim == 96


@pytest.mark.parametrize("keep", [0.6, 0.97])
def test_gguf_truncated_in_the_tensor_data(tmp_path, base, keep):
    p = copy(base["gguf"], tmp_path / "cut.gguf")
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    fails(p, "truncated GGUF file", "needs bytes up to")


@pytest.mark.parametrize("keep", [6, 20, 200, 700])
def test_gguf_truncated_in_the_header_or_metadata(tmp_path, base, keep):
    p = copy(base["gguf"], tmp_path / "cut.gguf")
    p.write_bytes(p.read_bytes()[:keep])
    fails(p, "truncated")


def test_gguf_corrupt_magic(tmp_path, base):
    p = copy(base["gguf"], tmp_path / "bad.gguf")
    p.write_bytes(b"GGUX" + p.read_bytes()[4:])
    fails(p, "not a GGUF file", "GGUX")
    q = copy(p, tmp_path / "bad.bin")  # no .gguf suffix: not recognised at all
    with pytest.raises(CheckpointError, match="unknown model file"):
        detect_format(q)


def test_gguf_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    fails(p, "not a GGUF file")


@pytest.mark.parametrize("field, value, expect", [
    ("version", struct.pack("<I", 99), "unsupported GGUF version 99"),
    ("version", struct.pack(">I", 3), "big-endian"),
    ("n_tensors", struct.pack("<Q", 2**60), "corrupt GGUF header"),
    ("n_kv", struct.pack("<Q", 2**40), "corrupt GGUF header"),
    ("first_key_len", struct.pack("<Q", 2**50), "metadata key #0"),
    ("first_value_type", struct.pack("<I", 77), "unknown value type 77"),
])
def test_gguf_corrupt_header(tmp_path, base, field, value, expect):
    p = copy(base["gguf"], tmp_path / "bad.gguf")
    data = bytearray(p.read_bytes())
    key_len = struct.unpack_from("<Q", data, 24)[0]
    at = {"version": 4, "n_tensors": 8, "n_kv": 16, "first_key_len": 24,
          "first_value_type": 32 + key_len}[field]
    data[at:at + len(value)] = value
    p.write_bytes(bytes(data))
    fails(p, expect)


def test_gguf_unknown_architecture(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "gpt2.gguf", arch="gpt2")
    fails(p, "unsupported GGUF architecture 'gpt2'")


def test_gguf_missing_metadata_key(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "nokey.gguf", drop_keys=("llama.block_count",))
    fails(p, "missing GGUF key 'llama.block_count'")


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q4_0", "Q8_0"])
def test_gguf_quantized_tensor_types_load_as_the_gguf_package_decodes_them(tmp_path, base, qtype):
    """The types K-quant files fall back to (Q5_0/Q5_1 where rows are not multiples of 256) load;
    the weight equals gguf-py's own dequantization of the stored blocks."""
    q = gguf.GGMLQuantizationType[qtype]
    name = "blk.1.ffn_up.weight"
    p = rewrite_gguf(base["gguf"], tmp_path / f"{qtype}.gguf", retype={name: q})
    stored = next(t for t in gguf.GGUFReader(p).tensors if t.name == name)
    assert stored.tensor_type == q
    ref = gguf.quants.dequantize(np.asarray(stored.data), q).reshape(CFG.hidden_dim, CFG.dim)
    got = load_model(p).model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))


def test_gguf_unsupported_tensor_type(tmp_path, base):
    q = gguf.GGMLQuantizationType.IQ2_XXS  # gguf-py cannot quantize it: blocks of the right size
    name = "blk.1.ffn_up.weight"
    block, size = gguf.GGML_QUANT_SIZES[q]
    blocks = np.zeros((CFG.hidden_dim, max(1, CFG.dim // block) * size), dtype=np.uint8)
    p = rewrite_gguf(base["gguf"], tmp_path / "iq2.gguf", retype={name: (q, blocks)})
    fails(p, f"tensor '{name}' has type IQ2_XXS", "does not support")


def test_gguf_missing_tensor(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "missing.gguf",
                     drop_tensors=("blk.1.ffn_up.weight",))
    fails(p, "missing tensors ['blk.1.ffn_up.weight']")


def test_gguf_unexpected_tensor(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "extra.gguf",
                     replace={"blk.0.attn_q_norm.weight": np.zeros(16, dtype=np.float32)})
    fails(p, "unexpected tensor 'blk.0.attn_q_norm.weight' for the llama architecture")


def test_gguf_bias_on_one_layer_only(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "bias.gguf",
                     replace={"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)})
    fails(p, "missing tensors", "blk.1.attn_q.bias")


def test_gguf_tensor_with_wrong_shape(tmp_path, base):
    p = rewrite_gguf(base["gguf"], tmp_path / "shape.gguf",
                     replace={"blk.0.ffn_gate.weight": np.zeros((128, 64), dtype=np.float32)})
    fails(p, "'blk.0.ffn_gate.weight' has shape (128, 64)", "implies (96, 64)")


def test_gguf_rope_freqs_that_no_llama3_scaling_produces(tmp_path, base):
    bad = np.linspace(1.0, 3.0, CFG.head_dim // 2).astype(np.float32) ** 3
    p = rewrite_gguf(base["gguf"], tmp_path / "rope.gguf", replace={"rope_freqs.weight": bad})
    fails(p, "rope_freqs tensor does not match")


def test_gguf_duplicate_tensor_name(tmp_path, base):
    p = copy(base["gguf"], tmp_path / "dup.gguf")
    data = p.read_bytes()
    a, b = b"blk.0.attn_q.weight", b"blk.0.attn_k.weight"  # same length: offsets stay valid
    i = data.index(b)
    p.write_bytes(data[:i] + a + data[i + len(a):])
    fails(p, "appears twice")


# -- HF / native directories --------------------------------------------------------------------
def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_hf_base_dirs_load(base):
    assert load_model(base["hf"]).format == "hf"
    assert load_model(base["hf_sharded"]).format == "hf"


@pytest.mark.parametrize("text, expect", [("{not json", "not valid JSON"),
                                          ("[1, 2]", "expected a JSON object"),
                                          (b"\xff\xfe{}", "not valid JSON")])
def test_hf_invalid_config_json(tmp_path, base, text, expect):
    d = copy(base["hf"], tmp_path / "m")
    path = d / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert str(path) in fails(d, expect)


@pytest.mark.parametrize("model_type, arch", [("phi3", "Phi3ForCausalLM"),
                                              ("gpt2", "GPT2LMHeadModel")])
def test_hf_unknown_model_type(tmp_path, base, model_type, arch):
    d = copy(base["hf"], tmp_path / "m")
    edit_config(d, model_type=model_type, architectures=[arch])
    fails(d, f"model_type={model_type!r}", "llamaworks reads llama, mistral, qwen2, qwen3, "
          "gemma3_text")


def test_hf_gemma3_with_vision_is_refused_naming_the_text_model_type(tmp_path, base):
    d = copy(base["hf"], tmp_path / "m")
    edit_config(d, model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    fails(d, "Gemma 3 with vision", "'gemma3_text'")


@pytest.mark.parametrize("changes, expect", [
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
    ({"num_attention_heads": 5, "head_dim": None}, "invalid model config"),
    ({"vocab_size": None}, "missing required key 'vocab_size'"),
    ({"num_hidden_layers": "two"}, "invalid model config"),
    ({"hidden_act": "gelu"}, "activation 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "'longrope' is not supported"),
])
def test_hf_invalid_config_values(tmp_path, base, changes, expect):
    d = copy(base["hf"], tmp_path / "m")
    edit_config(d, **changes)
    fails(d, expect)


def test_hf_missing_weights_file(tmp_path, base):
    d = copy(base["hf"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    fails(d, "no weights found")


@pytest.mark.parametrize("how", ["truncate", "garbage", "header-only"])
def test_hf_truncated_or_corrupt_safetensors(tmp_path, base, how):
    d = copy(base["hf"], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        f.write_bytes(b"\xff" * 256)
    else:
        f.write_bytes(data[:8 + struct.unpack("<Q", data[:8])[0]])
    msg = fails(d, "safetensors")
    assert str(f) in msg


def test_hf_index_names_a_missing_shard(tmp_path, base):
    d = copy(base["hf_sharded"], tmp_path / "m")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    msg = fails(d, "is missing", "model.safetensors.index.json")
    assert str(shards[-1]) in msg


@pytest.mark.parametrize("weight_map, expect", [
    ({}, "no 'weight_map'"),
    ({"model.norm.weight": "../outside.safetensors"}, "not a plain file name"),
])
def test_hf_bad_index(tmp_path, base, weight_map, expect):
    d = copy(base["hf_sharded"], tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails(d, expect)


def test_hf_tensor_with_wrong_shape(tmp_path, base):
    d = copy(base["hf"], tmp_path / "m")
    edit_config(d, intermediate_size=128)
    fails(d, "model.layers.0.mlp.gate_proj.weight has shape (96, 64)", "implies (128, 64)")


def test_hf_missing_tensor(tmp_path):
    sd = tiny_state_dict()
    sd.pop("model.layers.1.mlp.up_proj.weight")
    d = save_native(tmp_path / "m", CFG, sd)
    fails(d, "missing ['model.layers.1.mlp.up_proj.weight']")


# -- pickles carrying code are refused, and the code never runs --------------------------------
class Payload:
    """Unpickling this runs `exec`, which creates `sentinel`: the classic pickle exploit."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.sentinel)!r}).touch()",))


def write_malicious(path: Path, sentinel: Path) -> None:
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "norm.weight": Payload(sentinel)},
               path)


@pytest.mark.parametrize("layout", ["meta", "hf-bin"])
def test_pickle_with_code_is_refused_without_running(tmp_path, layout):
    sentinel = tmp_path / "PWNED"
    d = tmp_path / "m"
    d.mkdir()
    if layout == "meta":
        (d / "params.json").write_text(json.dumps({"dim": 4, "n_layers": 0, "n_heads": 1}))
        shard = d / "consolidated.00.pth"
    else:
        (d / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
        shard = d / "pytorch_model.bin"
    write_malicious(shard, sentinel)
    msg = fails(d, "refused: the pickle holds more than tensors", "exec", "weights_only=True")
    assert str(shard) in msg
    assert not sentinel.exists()
    # The payload is live: a plain unpickle would have run it.
    torch.load(shard, weights_only=False)
    assert sentinel.exists()


# -- Meta directories --------------------------------------------------------------------------
def meta_dir(tmp_path: Path, params: dict | None = None) -> Path:
    """A one-shard Meta checkpoint of CFG (weights need no realism for these tests)."""
    d = tmp_path / "meta"
    d.mkdir()
    sd = tiny_state_dict()
    names = {"model.embed_tokens.weight": "tok_embeddings.weight",
             "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
           "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm"}
    meta = {}
    for k, v in sd.items():
        if k in names:
            meta[names[k]] = v
        else:
            _, _, i, *mod, _ = k.split(".")
            meta[f"layers.{i}.{sub['.'.join(mod)]}.weight"] = v
    torch.save(meta, d / "consolidated.00.pth")
    p = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
         "norm_eps": 1e-5, "vocab_size": -1}
    (d / "params.json").write_text(json.dumps(params if params is not None else p))
    return d


def test_meta_base_dir_loads(tmp_path):
    loaded = load_model(meta_dir(tmp_path))
    assert loaded.format == "meta" and loaded.config.hidden_dim == 96


def test_meta_truncated_pth(tmp_path):
    d = meta_dir(tmp_path)
    f = d / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:5000])
    assert str(f) in fails(d, "truncated or corrupt torch file")


@pytest.mark.parametrize("missing", ["dim", "n_layers", "n_heads"])
def test_meta_params_json_missing_keys(tmp_path, missing):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
    params.pop(missing)
    d = meta_dir(tmp_path, params)
    assert str(d / "params.json") in fails(d, f"missing required key '{missing}'")


def test_meta_params_json_disagrees_with_weights(tmp_path):
    d = meta_dir(tmp_path, {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2})
    fails(d, "missing ['model.layers.2.")


def test_meta_without_shards_and_with_mismatched_shards(tmp_path):
    d = meta_dir(tmp_path)
    second = torch.load(d / "consolidated.00.pth", weights_only=True)
    second.pop("norm.weight")
    torch.save(second, d / "consolidated.01.pth")
    assert str(d / "consolidated.01.pth") in fails(d, "holds different tensors")
    for f in d.glob("*.pth"):
        f.unlink()
    fails(d, "no consolidated.NN.pth")


def test_meta_shard_that_is_not_a_dict_of_tensors(tmp_path):
    d = meta_dir(tmp_path)
    torch.save({"tok_embeddings.weight": [1, 2, 3]}, d / "consolidated.00.pth")
    fails(d, "'tok_embeddings.weight' is a list, not a tensor")  # weights_only allows lists
    torch.save([torch.zeros(2)], d / "consolidated.00.pth")
    fails(d, "expected a dict of tensors")


# -- format detection ----------------------------------------------------------------------------
def test_detect_format_missing_path_names_it(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="no such file or directory") as info:
        detect_format(p)
    assert str(p) in str(info.value)
    fails(p, "no such file", error=ModelNotFoundError)


def test_detect_format_non_model_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a model directory"):
        detect_format(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown model file"):
        detect_format(text)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        detect_format(two)


def test_detect_format_recognises_each_layout(tmp_path, base):
    assert detect_format(base["gguf"]) == "gguf"
    assert detect_format(base["gguf"].parent) == "gguf"  # a dir holding exactly one .gguf
    assert detect_format(base["hf"]) == "hf"
    assert detect_format(base["hf"] / "config.json") == "hf"
    assert detect_format(meta_dir(tmp_path)) == "meta"
