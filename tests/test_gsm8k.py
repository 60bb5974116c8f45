"""GSM8K answer extraction and scoring on tricky outputs."""

import json

import pytest

from sdlm.errors import SDLMError
from sdlm.eval import gsm8k


@pytest.mark.parametrize("text, expected", [
    ("She pays 3 + 4 = 7 dollars.\n#### 7", "7"),
    ("#### 1,234", "1,234"),
    ("So the total is $1,234.50.", "$1,234.50"),
    ("The answer is 18. Check: 2 + 16 = 18, and 5 more pages.", "18"),
    ("Answer: -3", "-3"),
    ("we get \\boxed{42} as required, step 3", "42"),
    ("He had 5 apples and ate 2, so 5 - 2 = 3 apples remain.", "3"),
    ("Half of it is .5", ".5"),
    ("The final answer is 3/4.", "3/4"),
    ("I do not know.", None),
    ("Step 1: 10 eggs. Step 2: sell 4. The answer is 6 eggs. #### 6", "6"),
])
def test_extract(text, expected):
    assert gsm8k.extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, ok", [
    ("$1,234.50", "1234.5", True),
    ("7.00", "7", True),
    ("7.", "7", True),
    (".5", "0.5", True),
    ("3/4", "0.75", True),
    ("-3", "3", False),
    ("18", "180", False),
    (None, "3", False),
    ("1,000,000", "1000000", True),
])
def test_is_correct(pred, gold, ok):
    assert gsm8k.is_correct(pred, gold) is ok


def test_gold_and_score(tmp_path):
    f = tmp_path / "g.jsonl"
    rows = [{"question": "q1", "answer": "work\n#### 1,200"}, {"question": "q2", "answer": "x\n#### -4"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probs = gsm8k.load(f)
    assert [p.gold for p in probs] == ["1200", "-4"]
    assert len(gsm8k.load(f, limit=1)) == 1
    s = gsm8k.score(["so $1,200 in all", "it is 4"], [p.gold for p in probs])
    assert s["correct"] == 1 and s["accuracy"] == 0.5 and s["per_problem"] == [True, False]
    with pytest.raises(SDLMError, match="one output per problem"):
        gsm8k.score(["1"], ["1", "2"])
    with pytest.raises(SDLMError, match="####"):
        gsm8k.gold_answer("no marker")
    with pytest.raises(SDLMError, match="not found"):
        gsm8k.load(tmp_path / "missing.jsonl")


def test_real_gold_answers_parse():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip("GSM8K test file not present")
    probs = gsm8k.load(path)
    assert len(probs) == 1319
    assert all(gsm8k.normalize(p.gold) is not None for p in probs)
