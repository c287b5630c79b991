"""Generative tasks: prompt -> greedy generation with stop strings -> answer extraction ->
exact match after normalising numbers."""

from __future__ import annotations

import re
from typing import Any

from llamaworks.eval.tasks import GenItem, gen_prompts

_NUM = r"-?[$]?\d[\d,]*(?:\.\d+)?"
_GSM = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS = re.compile(r"answer is[:\s]*(" + _NUM + ")", re.IGNORECASE)
_ANY_NUM = re.compile(_NUM)


def normalize(answer: str) -> str:
    """Canonical form for comparison: numbers without `$`, thousands commas or a zero
    fraction ("1,234.0" -> "1234"); other text stripped, lower-cased, final period dropped."""
    s = answer.strip().rstrip(".").strip()
    num = s.replace(",", "").replace("$", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", num):
        if "." in num:
            num = num.rstrip("0").rstrip(".")
        return "0" if num in ("-0", "") else num
    return s.lower()


def extract_answer(text: str) -> str | None:
    """The answer in a completion: GSM8K's `#### N`, else "the answer is N", else the last
    number; None if there is no number."""
    for pat in (_GSM, _ANSWER_IS):
        m = pat.search(text)
        if m:
            return normalize(m.group(1))
    nums = _ANY_NUM.findall(text)
    return normalize(nums[-1]) if nums else None


def evaluate_gen(llm: Any, items: list[GenItem], num_fewshot: int = 0, seed: int = 1234,
                 max_tokens: int = 256, chat: bool = False, limit: int | None = None
                 ) -> dict[str, Any]:
    """exact_match over `items` with greedy decoding; `chat` wraps each prompt in the model's
    chat template as one user turn. Scores the first `limit` items (few-shot examples come from
    all). Returns metrics plus per-item completions."""
    from llamaworks.infer.sampling import SamplingParams

    tok = llm.tokenizer
    prompts: list[Any] = gen_prompts(items, num_fewshot, seed)[:limit]
    items = items[:limit]
    if chat:
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}],
                                                      add_generation_prompt=True), bos=False)
                   for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=it.stop)
              for it in items]
    outs = llm.generate(prompts, params)
    hits, rows = [], []
    for it, o in zip(items, outs, strict=True):
        got = extract_answer(o.outputs[0].text)
        ok = got is not None and got == normalize(it.answer)
        hits.append(float(ok))
        rows.append({"completion": o.outputs[0].text, "extracted": got,
                     "answer": it.answer, "correct": ok})
    return {"metrics": {"n": len(items), "exact_match": sum(hits) / max(1, len(hits))},
            "items": rows}
