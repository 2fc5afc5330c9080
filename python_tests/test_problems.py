"""The built-in problem generator: determinism, exact answers, disjoint splits; datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unlock_fast.evaluation.grading import extract_answer, is_equivalent
from unlock_fast.evaluation.problems import (
    PROBLEM_KINDS,
    DatasetError,
    from_record,
    generate_problems,
    load_dataset_spec,
    load_jsonl,
    problem_splits,
)
from unlock_fast.prompts import format_prompts, use_chat


def test_same_seed_same_problems_and_prefix_stable() -> None:
    a = generate_problems(30, seed=3)
    b = generate_problems(30, seed=3)
    assert a == b
    assert generate_problems(10, seed=3) == a[:10]
    assert generate_problems(5, seed=3, start=10) == a[10:15]
    assert generate_problems(30, seed=4) != a


def _eval_step(expr: str) -> int:
    # "a x b = c" / "a + b = c" ... in a worked solution
    m = re.fullmatch(r"(\d+) ([-+x/]) (\d+)", expr.strip())
    assert m, expr
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op]


@pytest.mark.parametrize("kind", sorted(PROBLEM_KINDS))
def test_answers_are_exact_and_solutions_check_out(kind: str) -> None:
    for p in generate_problems(40, seed=1, kinds=[kind]):
        assert int(p.answer) >= 0
        # every "a op b = c" in the solution is true arithmetic
        for lhs, rhs in re.findall(r"(\d+ [-+x/] \d+) = (\d+)", p.solution or ""):
            assert _eval_step(lhs) == int(rhs), (p.question, p.solution)
        # the worked solution grades as correct with our own grader
        ext = extract_answer(p.solution or "")
        assert ext.method == "final"
        assert is_equivalent(ext.answer, p.answer)
        assert p.source.startswith(f"builtin:{kind}:")


def test_steps_select_kinds_and_bad_arguments_are_refused() -> None:
    one = generate_problems(50, seed=0, steps=[1])
    assert {p.source.split(":")[2] for p in one} == {"1"}
    three = generate_problems(20, seed=0, steps=[3])
    assert {p.source.split(":")[2] for p in three} == {"3"}
    with pytest.raises(ValueError, match="steps"):
        generate_problems(3, steps=[7])
    with pytest.raises(ValueError, match="kinds"):
        generate_problems(3, kinds=["nope"])
    with pytest.raises(ValueError, match="non-negative"):
        generate_problems(-1)


def test_splits_are_disjoint_and_deterministic() -> None:
    s = problem_splits({"train": 64, "heldout": 32, "test": 100}, seed=0)
    assert [len(s[k]) for k in ("train", "heldout", "test")] == [64, 32, 100]
    qs = [p.question for split in s.values() for p in split]
    assert len(qs) == len(set(qs))
    assert problem_splits({"train": 64, "heldout": 32, "test": 100}, seed=0) == s


def test_jsonl_formats(tmp_path: Path) -> None:
    rows = {
        "gsm8k.jsonl": [{"question": "Q1?", "answer": "step one\n#### 1,200"}],
        "math.jsonl": [{"problem": "P?", "solution": "so \\boxed{\\frac{1}{2}}", "level": "1"}],
        "svamp.jsonl": [{"ID": "s1", "Body": "Tom has 3.", "Question": "How many?", "Answer": 3.0}],
        "generic.jsonl": [{"prompt": "2+2?", "target": "4"}],
    }
    for name, data in rows.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in data) + "\n\n")
    g = load_jsonl(tmp_path / "gsm8k.jsonl")[0]
    assert (g.answer, g.source, g.solution) == ("1200", "gsm8k", "step one")
    m = load_jsonl(tmp_path / "math.jsonl")[0]
    assert (m.answer, m.source) == ("\\frac{1}{2}", "math")
    s = load_jsonl(tmp_path / "svamp.jsonl")[0]
    assert (s.question, s.answer, s.id) == ("Tom has 3. How many?", "3", "s1")
    assert load_jsonl(tmp_path / "generic.jsonl")[0].answer == "4"
    assert len(load_dataset_spec(str(tmp_path / "gsm8k.jsonl"))) == 1
    assert len(load_dataset_spec("builtin", limit=7)) == 7


def test_bad_datasets_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"\n')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_jsonl(bad)
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DatasetError, match="question field"):
        load_jsonl(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="no answer"):
        from_record({"problem": "p", "solution": "no box"})


class _ChatTok:
    """A stand-in tokenizer with a chat template that the real API renders."""

    chat_template = "x"
    bos_token = "<s>"
    bos_token_id = 1

    def __call__(self, _text: str) -> dict:
        return type("E", (), {"input_ids": [1, 5]})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):  # noqa: ARG002
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return "<s>" + body + ("<assistant>" if add_generation_prompt else "")


def test_prompt_forms() -> None:
    q = "Tom has 3 apples. How many?"
    assert format_prompts([q], "direct")[0] == f"{q}\n\nAnswer:\n"
    assert format_prompts([q], "cot")[0] == f"{q}\n\nAnswer: Let's think step by step.\n"
    tok = _ChatTok()
    assert use_chat(tok, "auto")
    assert not use_chat(None, "auto")
    chat = format_prompts([q], "cot", tokenizer=tok, chat=True)[0]
    # the BOS the tokenizer adds itself is not doubled; the answer prefix opens the reply
    assert chat == f"<user>{q}</user><assistant>Answer: Let's think step by step.\n"
    assert format_prompts([q, q], "direct") == format_prompts([q], "direct") * 2
    with pytest.raises(ValueError, match="style"):
        format_prompts([q], "fancy")
    with pytest.raises(ValueError, match="no chat template"):
        format_prompts([q], tokenizer=object(), chat=True)
