"""`llamaworks convert` checks the source against its config before writing, loads what it wrote
back before moving it into place, and never merges into a folder that holds other files: a broken
source or a bad write exits 2 with a clear message and leaves no output, not even a partial one."""

from __future__ import annotations

import pytest
import torch
from test_checkpoint_errors import CFG, tiny_state_dict

from llamaworks.checkpoint import load_state_dict, save_native
from llamaworks.cli import main
from llamaworks.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300)


def _source(folder, tok, change=None):
    sd = tiny_state_dict()
    if change is not None:
        change(sd)
    return save_native(folder / "src", CFG, sd, tokenizer=tok)


BROKEN = {
    "a missing tensor": (lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"),
                         "missing ['model.layers.1.mlp.down_proj.weight']"),
    "a wrong shape": (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight":
                                            torch.zeros(64, 32)}),
                      "model.layers.0.self_attn.q_proj.weight has shape (64, 32)"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_source_is_refused_with_exit_2_and_no_output(tmp_path, tok, capsys, broken):
    change, says = BROKEN[broken]
    src = _source(tmp_path, tok, change)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and says in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary


def test_a_written_checkpoint_that_does_not_load_back_is_not_moved_into_place(
        tmp_path, tok, capsys, monkeypatch):
    import llamaworks.checkpoint.convert as conv

    def save_then_truncate(d, *a, **kw):
        conv_out = save_native(d, *a, **kw)
        w = conv_out / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
        return conv_out

    monkeypatch.setattr(conv, "save_native", save_then_truncate)
    src = _source(tmp_path, tok)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "the converted checkpoint does not load back" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_never_merges_into_a_folder_with_files_and_fills_a_new_one(tmp_path, tok,
                                                                           capsys):
    src = _source(tmp_path, tok)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["convert", str(src), str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    out = tmp_path / "new"
    assert main(["convert", str(src), str(out), "--dtype", "float32"]) == 0
    assert "loaded back and checked" in capsys.readouterr().out
    _, got, _ = load_state_dict(out)
    want = tiny_state_dict()
    assert all(got[k].equal(want[k]) for k in got) and len(got) == len(want)
    assert (out / "tokenizer.json").exists()
