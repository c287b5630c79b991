"""The prepare pipeline: mixture proportions, shard round-trip, manifest, report, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_fixtures import small_sources, write_recipe

from llamaworks.data.mixture import mixture_targets
from llamaworks.data.pipeline import prepare
from llamaworks.data.recipe import load_recipe
from llamaworks.data.shards import file_sha256, read_manifest, split_tokens
from llamaworks.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    src = small_sources(d)
    recipe = write_recipe(d, src, {"kjv": 0.25, "jargon": 0.75}, {"kjv": 1.0, "jargon": 3.0})
    return d / "out", prepare(load_recipe(recipe), d / "out", progress=False), src


@pytest.mark.slow
def test_mixture_weights_are_honoured_within_two_percent_of_tokens(prepared):
    _, m, _ = prepared
    fr = {k: v["fraction"] for k, v in m["sources"].items()}
    assert abs(fr["kjv"] - 0.25) < 0.02 and abs(fr["jargon"] - 0.75) < 0.02
    # kjv is the binding source (1 epoch), jargon is repeated up to its 3 allowed epochs
    assert m["sources"]["kjv"]["train_tokens"] <= m["sources"]["kjv"]["available_tokens"] * 1.02
    assert m["sources"]["jargon"]["train_tokens"] > m["sources"]["jargon"]["available_tokens"]


def test_mixture_targets_take_the_largest_total_the_epochs_allow():
    t = mixture_targets({"a": 1000, "b": 100}, {"a": 0.5, "b": 0.5}, {"a": 1, "b": 2})
    assert t == {"a": 200, "b": 200}


def test_shards_round_trip_to_the_kept_documents_with_bos_eos(prepared):
    out, m, _ = prepared
    assert m["dtype"] == "uint16"
    tok = Tokenizer.from_dir(out / "tokenizer")
    assert m["tokenizer_sha256"] == file_sha256(out / "tokenizer" / "tokenizer.json")
    assert sum(s["tokens"] for s in m["train"]) == m["train_tokens"]
    val = np.concatenate(split_tokens(out, "val")).tolist()
    assert val[0] == tok.bos_id
    docs, cur = [], []
    for t in val:
        if t == tok.eos_id:
            docs.append(tok.decode(cur[1:]))
            cur = []
        else:
            cur.append(t)
    kept = [json.loads(x) for s in ("kjv", "jargon")
            for x in (out / "clean" / f"{s}.jsonl").read_text().splitlines()]
    assert docs == [d["text"] for d in kept if d["split"] == "val"]
    assert len(docs) > 0


def test_report_counts_kept_and_dropped_documents_per_rule(prepared):
    _, m, _ = prepared
    j = m["sources"]["jargon"]
    assert j["read"] == 300 and j["kept"] + sum(j["dropped"].values()) == 300
    assert j["dropped"]["min_words"] > 0


def test_prepare_resumes_from_completed_stages_with_identical_output(prepared, tmp_path):
    out, m, _ = prepared
    for f in out.glob("train_*.bin"):
        f.unlink()
    (out / "manifest.json").unlink()
    recipe = load_recipe(out.parent / "recipe.toml")
    recipe.sources[0].path = str(tmp_path / "gone.jsonl")  # clean stage must not re-read it
    m2 = prepare(recipe, out, progress=False)
    assert m2["train"] == m["train"] and m2["sources"] == m["sources"]
    assert read_manifest(out)["train_tokens"] == m["train_tokens"]


def test_exact_and_near_duplicates_across_sources_are_dropped(tmp_path):
    src = small_sources(tmp_path, n_kjv=20, n_jargon=0)
    rows = [json.loads(x) for x in src["kjv"].read_text().splitlines()]
    dup = [{"id": "x" + r["id"], "text": r["text"] + " And it was so."} for r in rows[:5]]
    dup.append({"id": "exact", "text": rows[6]["text"]})
    (tmp_path / "copies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dup))
    src = {"kjv": src["kjv"], "copies": tmp_path / "copies.jsonl"}
    r = write_recipe(tmp_path, src, {"kjv": 0.5, "copies": 0.5})
    from llamaworks.data.pipeline import _clean_sources

    stats = _clean_sources(load_recipe(r), tmp_path / "out", progress=False)
    assert stats["copies"]["dropped"] == {"exact_dup": 1, "near_dup": 5}


def _with_bad_lines(tmp_path, setting: str | None):
    """A recipe whose `kjv` source has 20 documents with 3 bad lines among them (lines 3, 8,
    14), and `[data] bad_records = setting`."""
    src = small_sources(tmp_path, n_kjv=20, n_jargon=40)
    lines = src["kjv"].read_bytes().splitlines(keepends=True)
    for at, bad in ((2, b"[1, 2]\n"), (7, b"3.5\n"), (13, b'{"text": "\xff\xfe"}\n')):
        lines.insert(at, bad)
    src["kjv"].write_bytes(b"".join(lines))
    r = write_recipe(tmp_path, src, {"kjv": 0.5, "jargon": 0.5})
    if setting is not None:
        r.write_text(r.read_text().replace("[data]\n", f'[data]\nbad_records = "{setting}"\n'))
    return r, src["kjv"]


def test_prepare_stops_at_a_bad_record_by_default_naming_file_and_line(tmp_path, capsys):
    from llamaworks.cli import main

    recipe, kjv = _with_bad_lines(tmp_path, None)
    assert main(["data", "prepare", "--config", str(recipe), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{kjv}:3: an array, not a JSON object" in err and 'bad_records = "skip"' in err


def test_prepare_with_bad_records_skip_counts_them_in_the_report(tmp_path, capsys):
    from llamaworks.cli import main

    recipe, kjv = _with_bad_lines(tmp_path, "skip")
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as warned:
        assert main(["data", "prepare", "--config", str(recipe), "--out", str(out),
                     "--workers", "1", "--no-progress"]) == 0
    assert [str(w.message).split(": ")[0] for w in warned] == [f"{kjv}:{n}" for n in (3, 8, 14)]
    s = read_manifest(out)["sources"]["kjv"]
    assert s["read"] == 23 and s["dropped"]["bad_record"] == 3
    assert s["kept"] + sum(s["dropped"].values()) == 23
    assert "bad_record 3" in capsys.readouterr().out


def test_an_unknown_bad_records_setting_is_a_recipe_error(tmp_path):
    from llamaworks.errors import LlamaworksError

    recipe, _ = _with_bad_lines(tmp_path, "ignore")
    with pytest.raises(LlamaworksError, match=r"bad_records = 'ignore'; use 'stop' or 'skip'"):
        load_recipe(recipe)
