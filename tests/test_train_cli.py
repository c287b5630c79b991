"""`llamaworks pretrain` configuration: preset < recipe [model]/[train] < CLI flags; the shipped
recipes parse; errors name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaworks.cli import build_parser, main
from llamaworks.data.recipe import load_recipe
from llamaworks.train.cli import resolve

ROOT = Path(__file__).resolve().parents[1]


def test_cli_flags_override_the_recipe_which_overrides_the_preset(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text((ROOT / "recipes" / "demo.toml").read_text()
                 + '\n[model]\npreset = "tiny"\ndim = 96\n\n[train]\nlr = 0.01\nseq_len = 64\n')
    args = build_parser().parse_args(["pretrain", "--config", str(r), "--seq-len", "32",
                                      "--set", "n_layers=3", "--max-steps", "7"])
    cfg, tc, recipe = resolve(args)
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size) == (96, 3, 512)
    assert (tc.lr, tc.seq_len, tc.max_steps) == (0.01, 32, 7)
    assert (tc.beta1, tc.beta2, tc.weight_decay, tc.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert [s.name for s in recipe.sources] == ["kjv", "jargon"]


def test_the_llama1_recipe_maps_the_papers_mixture():
    r = load_recipe(ROOT / "recipes" / "llama1.toml")
    w = {k: round(v * 100, 2) for k, v in r.weights().items()}
    assert w == {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5,
                 "books": 4.5, "arxiv": 2.5, "stackexchange": 2.0}
    assert r.model["preset"] == "llama-7b" and r.train["warmup_steps"] == 2000


def test_missing_source_paths_are_reported_with_the_fix(tmp_path, capsys):
    code = main(["data", "prepare", "--config", str(ROOT / "recipes" / "llama1.toml"),
                 "--out", str(tmp_path), "--path", f"commoncrawl={tmp_path / 'nope'}"])
    assert code == 2
    assert "does not exist; download the data there" in capsys.readouterr().err


def test_unknown_train_keys_in_a_recipe_are_errors(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text((ROOT / "recipes" / "demo.toml").read_text() + "\n[train]\nlearning_rate = 1\n")
    with pytest.raises(Exception, match="unknown training option.*learning_rate"):
        resolve(build_parser().parse_args(["pretrain", "--config", str(r)]))
