"""Published dataset layouts -> llamaworks task files, with lm-eval's prompts.

Each converter takes one record as the dataset publishes it (the JSON/JSONL you can export from
the dataset's release or from the Hugging Face copy) and returns one task item:
- hellaswag: ctx_a/ctx_b/activity_label/endings/label, with lm-eval's `preprocess` (WikiHow
  bracket artefacts removed) -> {"context": "<label>: <ctx>", "choices": [" ending", ...]};
- piqa: goal/sol1/sol2/label -> "Question: <goal>\\nAnswer:" + [" sol1", " sol2"];
- arc: question/choices{text,label}/answerKey (HF layout) or the AI2 release's
  question{stem,choices[{text,label}]} -> "Question: <q>\\nAnswer:" + [" text", ...];
- boolq: passage/question/answer (true/false; or label 0/1) -> "<passage>\\nQuestion:
  <question>?\\nAnswer:" + [" no", " yes"];
- gsm8k: question/answer ending "#### N" -> {"prompt": "Question: <q>\\nAnswer:", "answer": N,
  "target": " <worked answer>", "stop": lm-eval's}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaworks.atomic import atomic_write_text
from llamaworks.eval.tasks import TaskError, read_jsonl


def _hellaswag_pre(text: str) -> str:
    """lm-eval's hellaswag `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"context": _hellaswag_pre(r["activity_label"] + ": " + ctx),
            "choices": [" " + _hellaswag_pre(e) for e in r["endings"]], "gold": int(r["label"])}


def piqa(r: dict) -> dict:
    return {"context": f"Question: {r['goal']}\nAnswer:",
            "choices": [" " + r["sol1"], " " + r["sol2"]], "gold": int(r["label"])}


def arc(r: dict) -> dict:
    q = r["question"]
    if isinstance(q, dict):  # the AI2 release: question{stem, choices[{text, label}]}
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
        q = q["stem"]
    else:
        texts, labels = list(r["choices"]["text"]), list(r["choices"]["label"])
    if r["answerKey"] not in labels:
        raise ValueError(f"answerKey {r['answerKey']!r} is not one of the labels {labels}")
    return {"context": f"Question: {q}\nAnswer:", "choices": [" " + t for t in texts],
            "gold": labels.index(r["answerKey"])}


def boolq(r: dict) -> dict:
    if "answer" in r:
        ans = r["answer"]
        gold = int(ans if isinstance(ans, bool) else str(ans).lower() in ("true", "yes", "1"))
    else:
        gold = int(r["label"])
    return {"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            "choices": [" no", " yes"], "gold": gold}


def gsm8k(r: dict) -> dict:
    m = re.search(r"####\s*(.+?)\s*$", r["answer"])
    if not m:
        raise ValueError("the answer has no '#### N' line")
    return {"prompt": f"Question: {r['question']}\nAnswer:",
            "answer": m.group(1).replace(",", ""), "target": " " + r["answer"],
            "stop": ["Question:", "</s>", "<|im_end|>"]}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "hellaswag": hellaswag, "piqa": piqa, "arc": arc, "boolq": boolq, "gsm8k": gsm8k}


def _records(path: Path) -> list[dict]:
    """JSONL lines, or a JSON file holding a list (or {"data": [...]}) of records."""
    if path.suffix == ".json":
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TaskError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise TaskError(f"{path}: expected a list of records")
        return data
    return read_jsonl(path)


def convert_records(fmt: str, records: list[dict]) -> list[dict]:
    """Convert records of dataset `fmt`; errors name the record and the missing field."""
    if fmt not in CONVERTERS:
        raise TaskError(f"unknown format {fmt!r}; known: {', '.join(CONVERTERS)}")
    out = []
    for i, r in enumerate(records, 1):
        try:
            out.append(CONVERTERS[fmt](r))
        except KeyError as e:
            raise TaskError(f"record {i}: no field {e} (is this the {fmt} layout?)") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise TaskError(f"record {i}: {e}") from None
    return out


def convert_file(fmt: str, src: str | Path, dst: str | Path) -> int:
    """Write the task file `dst` (atomically) from dataset file `src`; returns the item count."""
    items = convert_records(fmt, _records(Path(src)))
    atomic_write_text(Path(dst), "".join(json.dumps(it, ensure_ascii=False) + "\n"
                                         for it in items))
    return len(items)
