"""Converters from the published dataset layouts to our task schema, checked on hand-written
records in each layout (HellaSwag against lm-eval's own preprocessing code)."""

from __future__ import annotations

import json

import pytest

from llamaworks.cli import main
from llamaworks.eval.convert import convert_records
from llamaworks.eval.tasks import TaskError, load_task_file

HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over "
     "the snow covering the window of a car, and a woman wearing winter clothes smiles.",
     "ctx_b": "then", "ctx": "...", "split": "val", "split_type": "indomain", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.",
                 ", a person board a ski lift, while two men supporting the head of the person "
                 "wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."], "source_id": "x"},
    {"ind": 9, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye "
     "your hair [title] Wash your  hair.", "ctx_b": "[step] use a mild shampoo",
     "ctx": "...", "label": "0",
     "endings": ["Rinse well [substeps] Then dry.", "Cut it all off.",
                 "[title] Paint the  walls.", "Eat the shampoo."]},
]


@pytest.mark.slow
def test_hellaswag_matches_lm_eval_preprocessing():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    ref = process_docs(datasets.Dataset.from_list(
        [{**r, "label": str(r["label"])} for r in HELLASWAG]))
    got = convert_records("hellaswag", HELLASWAG)
    for g, r in zip(got, ref, strict=True):
        assert g["context"] == r["query"]
        assert g["choices"] == [" " + c for c in r["choices"]]  # lm-eval's " " delimiter
        assert g["gold"] == r["gold"]
    assert got[1]["context"] == ("Personal Care and Style: How to dye your hair. Wash your "
                                 "hair. use a mild shampoo")


def test_piqa_arc_boolq_layouts():
    piqa = convert_records("piqa", [{"goal": "How do I open a jar?", "sol1": "Twist the lid.",
                                     "sol2": "Freeze the lid.", "label": 0}])
    assert piqa == [{"context": "Question: How do I open a jar?\nAnswer:",
                     "choices": [" Twist the lid.", " Freeze the lid."], "gold": 0}]
    hf_arc = {"id": "Mercury_1", "question": "Which gas do plants absorb?",
              "choices": {"text": ["oxygen", "carbon dioxide", "helium"],
                          "label": ["A", "B", "C"]}, "answerKey": "B"}
    ai2_arc = {"id": "Mercury_1", "answerKey": "2", "question": {
        "stem": "Which gas do plants absorb?", "choices": [
            {"text": "oxygen", "label": "1"}, {"text": "carbon dioxide", "label": "2"},
            {"text": "helium", "label": "3"}]}}
    want = {"context": "Question: Which gas do plants absorb?\nAnswer:",
            "choices": [" oxygen", " carbon dioxide", " helium"], "gold": 1}
    assert convert_records("arc", [hf_arc, ai2_arc]) == [want, want]
    boolq = convert_records("boolq", [
        {"question": "is the sky blue", "title": "Sky", "answer": True,
         "passage": "The sky appears blue."},
        {"question": "do fish fly", "passage": "Fish swim.", "label": 0}])
    assert boolq[0] == {"context": "The sky appears blue.\nQuestion: is the sky blue?\nAnswer:",
                        "choices": [" no", " yes"], "gold": 1}
    assert boolq[1]["gold"] == 0


def test_gsm8k_layout_keeps_the_worked_answer_for_few_shot():
    rec = {"question": "Tom has 1,200 coins and gets 34 more. How many?",
           "answer": "He has 1,200 + 34 = <<1200+34=1234>>1,234 coins.\n#### 1,234"}
    (item,) = convert_records("gsm8k", [rec])
    assert item["prompt"] == "Question: Tom has 1,200 coins and gets 34 more. How many?\nAnswer:"
    assert item["answer"] == "1234"
    assert item["target"] == " " + rec["answer"]
    assert "Question:" in item["stop"]


def test_convert_cli_writes_a_task_file_eval_reads(tmp_path, capsys):
    src = tmp_path / "hellaswag_val.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    out = tmp_path / "hs.jsonl"
    assert main(["eval", "convert", "--from", "hellaswag", str(src), str(out)]) == 0
    assert "wrote 2 items" in capsys.readouterr().out
    task = load_task_file(out)
    assert task.kind == "mc" and [it.gold for it in task.items] == [3, 0]
    src_json = tmp_path / "gsm8k.json"  # a JSON list works too
    src_json.write_text(json.dumps([{"question": "1+1?", "answer": "2\n#### 2"}]))
    assert main(["eval", "convert", "--from", "gsm8k", str(src_json), str(out)]) == 0
    assert load_task_file(out).kind == "gen"


def test_wrong_layout_names_the_record_and_field(tmp_path, capsys):
    with pytest.raises(TaskError, match="record 1: no field 'sol1'"):
        convert_records("piqa", [{"goal": "x"}])
    with pytest.raises(TaskError, match="####"):
        convert_records("gsm8k", [{"question": "q", "answer": "no marker"}])
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "q"}\n')
    assert main(["eval", "convert", "--from", "boolq", str(src), str(tmp_path / "o.jsonl")]) == 2
    assert "no field" in capsys.readouterr().err
