"""GSM8K: gold answers, answer extraction from free-form model output, scoring.

The gold answer is the number after ``####`` in the dataset's ``answer`` field.
A model's answer is, in order of preference: the number after a ``####``
marker, inside ``\\boxed{...}``, after "the answer is" / "answer:", and
otherwise the last number in the text. Numbers are compared as exact decimals
after removing thousands separators, currency signs, units and trailing zeros
(``$1,234.50`` == ``1234.5``); a fraction ``a/b`` is compared by value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from ..errors import SDLMError

_NUM = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_MARKERS = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*[:=]?\s*(" + _NUM + ")", re.IGNORECASE),
]


@dataclass
class Problem:
    question: str
    gold: str  # the gold number as written after ####


def normalize(number: str) -> Fraction | None:
    """A number as written (``$1,234.50``, ``-3``, ``.5``, ``3/4``) -> exact value, or None."""
    s = number.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        if "/" in s:
            a, b = s.split("/")
            return Fraction(Fraction(Decimal(a)), Fraction(Decimal(b))) if Decimal(b) != 0 else None
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def gold_answer(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K ``answer`` field."""
    if "####" not in answer_field:
        raise SDLMError("a GSM8K answer field has no '####' line: is this the GSM8K jsonl (question/answer)?")
    return answer_field.split("####")[-1].strip().replace(",", "")


def extract_answer(text: str) -> str | None:
    """The model's final numeric answer as written, or None when the text has no number."""
    for rx in _MARKERS:
        found = rx.findall(text)
        if found:
            return found[-1].strip()
    nums = _NUM_RE.findall(text)
    return nums[-1].strip() if nums else None


def is_correct(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    p, g = normalize(prediction), normalize(gold)
    return p is not None and g is not None and p == g


def score(outputs: list[str], golds: list[str]) -> dict:
    """Accuracy of model outputs (free text) against gold numbers."""
    if len(outputs) != len(golds):
        raise SDLMError(f"{len(outputs)} outputs for {len(golds)} gold answers: give one output per problem")
    preds = [extract_answer(o) for o in outputs]
    correct = [is_correct(p, g) for p, g in zip(preds, golds)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "correct": sum(correct), "n": len(correct),
            "predictions": preds, "per_problem": correct}


def load(path: str | Path, limit: int | None = None) -> list[Problem]:
    """GSM8K problems from a local jsonl (``question``/``answer`` records), the first ``limit``."""
    p = Path(path)
    if not p.is_file():
        raise SDLMError(f"GSM8K file {path} not found: give the path to test.jsonl (question/answer records)")
    from ..train.data import read_records

    out = []
    for i, rec in enumerate(read_records(str(p)), 1):
        if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
            raise SDLMError(f"{path}, record {i}: not a GSM8K record; expected question and answer")
        out.append(Problem(rec["question"], gold_answer(rec["answer"])))
        if limit is not None and len(out) >= limit:
            break
    return out
