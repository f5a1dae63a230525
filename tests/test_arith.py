"""The `arith` task: the solver, the verifier, and the split generators."""

from __future__ import annotations

import itertools
import random
import re
import zlib

import pytest

from bridgectl.tasks.arith import ArithTask, extract_answer, random_problem, reward, solve


def bucket(question: str) -> int:
    """Independent copy of the documented split rule: crc32 of the question text, mod 100."""
    return zlib.crc32(question.encode("utf-8")) % 100


def parse(question: str) -> tuple[list[int], list[str]]:
    assert question.endswith("=")
    tokens = re.findall(r"\d+|[+\-*]", question[:-1])
    return [int(t) for t in tokens[0::2]], tokens[1::2]


# ---- solve: hand-evaluated cases ---------------------------------------------------------------------------
# (question, modulus, trace, answer): every trace worked out by hand, products first, then left to right.
HAND_CASES = [
    # the docstring's example: 9*3=27->7, 5*3=15->5, 4+7=11->1, 1-5=-4->6
    ("4+9*3-5*3", 10, "9*3=7;5*3=5;4+7=1;1-5=6;", 6),
    # chained products: 2*3=6, 6*4=24->4
    ("2*3*4", 10, "2*3=6;6*4=4;", 4),
    # 7*8=56->6, 6*9=54->4, 4*2=8
    ("7*8*9*2", 10, "7*8=6;6*9=4;4*2=8;", 8),
    # a chained product inside a sum: 2*3=6, 6*4=24->4, 5+4=9, 9-1=8
    ("5+2*3*4-1", 10, "2*3=6;6*4=4;5+4=9;9-1=8;", 8),
    # two product groups: 2*9=18->8, 3*3=9, 9*3=27->7, 8-8=0, 0+7=7
    ("8-2*9+3*3*3", 10, "2*9=8;3*3=9;9*3=7;8-8=0;0+7=7;", 7),
    # subtraction wrapping below zero: 1-9=-8->2
    ("1-9", 10, "1-9=2;", 2),
    # 3-4=-1->9, 9-5=4
    ("3-4-5", 10, "3-4=9;9-5=4;", 4),
    # a product subtracted: 3*3=9, 1-9=-8->2
    ("1-3*3", 10, "3*3=9;1-9=2;", 2),
    # addition wrapping to zero: 9+1=10->0
    ("9+1", 10, "9+1=0;", 0),
    # no products: strictly left to right (1-2=-1->9, 9+3=12->2)
    ("1-2+3", 10, "1-2=9;9+3=2;", 2),
    # modulus 7: 6*5=30->2, 2+4=6
    ("6*5+4", 7, "6*5=2;2+4=6;", 6),
    # modulus 7: 3-5=-2->5
    ("3-5", 7, "3-5=5;", 5),
    # modulus 7, operands above the modulus: 9*2=18->4, 9+4=13->6
    ("9+9*2", 7, "9*2=4;9+4=6;", 6),
    # modulus 7: 8*8=64->1, 1*8=8->1
    ("8*8*8", 7, "8*8=1;1*8=1;", 1),
]


@pytest.mark.parametrize("expression,modulus,trace,answer", HAND_CASES)
def test_solve_hand_cases(expression, modulus, trace, answer):
    operands, operators = parse(expression + "=")
    assert solve(operands, operators, modulus) == (trace, answer)


def test_problem_completions_match_the_documented_format():
    problem = random_problem(random.Random(0), 3, 10, 9)
    assert problem.trace_completion == problem.trace + "#" + problem.answer
    assert problem.direct_completion == "#" + problem.answer
    assert extract_answer(problem.trace_completion) == int(problem.answer)


# ---- solve: independent reference over random problems ----------------------------------------------------
STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+);")


def check_trace(question: str, trace: str, answer: str, n_ops: int, modulus: int) -> None:
    operands, operators = parse(question)
    assert len(operators) == n_ops and len(operands) == n_ops + 1
    # +, -, * are ring operations, so reducing every intermediate mod m gives the plain integer result mod m.
    assert int(answer) == eval(question[:-1]) % modulus  # noqa: S307 (digits and + - * only)
    steps = STEP.findall(trace)
    assert "".join(f"{a}{op}{b}={c};" for a, op, b, c in steps) == trace, "trace is not a list of `a op b=c;` steps"
    assert len(steps) == n_ops
    for a, op, b, c in steps:
        exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(c) == exact % modulus, f"wrong step {a}{op}{b}={c} mod {modulus}"
        assert 0 <= int(c) < modulus
    # precedence: every product step comes before every + / - step
    kinds = [op == "*" for _, op, _, _ in steps]
    assert kinds == sorted(kinds, reverse=True)
    assert [op for _, op, _, _ in steps if op != "*"] == [op for op in operators if op != "*"]
    assert steps[-1][3] == answer


@pytest.mark.parametrize("modulus,max_operand", [(10, 9), (7, 9), (13, 9)])
def test_solve_matches_reference_on_random_problems(modulus, max_operand):
    rng = random.Random(f"ref-{modulus}")
    for _ in range(300):
        n_ops = rng.randint(1, 6)
        problem = random_problem(rng, n_ops, modulus, max_operand)
        assert problem.n_ops == n_ops
        check_trace(problem.question, problem.trace, problem.answer, n_ops, modulus)


# ---- verifier ----------------------------------------------------------------------------------------------
EXTRACT_CASES = [
    ("#7", 7),
    ("# 7", 7),
    ("#### -12", -12),
    ("##7", 7),
    ("#12", 12),
    ("#07", 7),
    ("9*3=7;5*3=5;4+7=1;1-5=6;#6", 6),
    ("the answer is #3, no wait, #5", 5),  # several marks: the last one wins
    ("#1#2", 2),
    ("#4 then # 8 then ####9", 9),
    ("#7.", 7),  # trailing punctuation
    ("#7!", 7),
    ("(#7)", 7),
    ("So the final answer is #8 because 3+5=8.", 8),  # prose around it; unmarked digits after are ignored
    ("abc #5 def 17", 5),
    ("42", None),  # digits without a mark
    ("4+9*3-5*3=9*3=7;", None),
    ("", None),
    ("#", None),  # a mark with no number
    ("# ", None),
    ("#x7", None),
    ("answer: #", None),
    ("9*3=7;5*3=5;4+7=1;1-", None),  # cut off mid-trace
    ("9*3=7;5*3=5;4+7=1;1-5=6;#", None),  # cut off right after the mark
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("9*3=7;5*3=5;4+7=1;1-5=6;#6", "6", 1.0),
        ("#6", "6", 1.0),
        ("# 6.", "6", 1.0),
        ("#06", "6", 1.0),
        ("#6", "7", 0.0),
        ("#16", "6", 0.0),
        ("#-4", "6", 0.0),  # no modular normalisation of the prediction
        ("the answer is 6", "6", 0.0),  # no mark, no reward (and no format reward either)
        ("#6 ... actually #7", "6", 0.0),
        ("#7 ... actually #6", "6", 1.0),
        ("9*3=7;5*3=5;4+7=1;1-", "6", 0.0),
        ("", "0", 0.0),
        ("#0", "0", 1.0),
    ],
)
def test_reward(completion, gold, expected):
    value = reward(completion, gold)
    assert isinstance(value, float)
    assert value == expected
    assert ArithTask.reward(completion, gold) == expected


# ---- generators --------------------------------------------------------------------------------------------
def take(iterator, n):
    return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("stream", ["sft_examples", "rl_prompts", "pretrain_problems"])
def test_streams_are_deterministic_per_seed(task_cfg, stream):
    first = take(getattr(ArithTask(task_cfg), stream)(0), 200)
    again = take(getattr(ArithTask(task_cfg), stream)(0), 200)
    other = take(getattr(ArithTask(task_cfg), stream)(1), 200)
    assert first == again
    assert [p.question for p in first] != [p.question for p in other]


def test_train_streams_respect_train_ops_and_are_correct(task_cfg):
    task = ArithTask(task_cfg)
    low, high = task_cfg.train_ops
    for problem in take(task.sft_examples(3), 500) + take(task.rl_prompts(3), 500):
        assert low <= problem.n_ops <= high
        check_trace(problem.question, problem.trace, problem.answer, problem.n_ops, task_cfg.modulus)
        assert all(1 <= a <= task_cfg.max_operand for a in parse(problem.question)[0])


def test_splits_are_disjoint(task_cfg):
    task = ArithTask(task_cfg)
    sft = {p.question for seed in (0, 1) for p in take(task.sft_examples(seed), 2000)}
    rl = {p.question for seed in (0, 1) for p in take(task.rl_prompts(seed), 2000)}
    test = {p.question for p in task.eval_problems("test", 300)}
    ood = {p.question for p in task.eval_problems("ood", 300)}
    assert len(sft) > 1000 and len(rl) > 1000  # the check below is not vacuous
    assert not sft & rl
    assert not (sft | rl) & (test | ood)
    # and they come from the documented hash buckets
    assert all(10 <= bucket(q) < 55 for q in sft)
    assert all(55 <= bucket(q) < 100 for q in rl)
    assert all(bucket(q) < 10 for q in test | ood)


@pytest.mark.parametrize("split,ops_key", [("test", "test_ops"), ("ood", "ood_ops")])
def test_eval_problems_distinct_fixed_and_sized(task_cfg, split, ops_key):
    problems = ArithTask(task_cfg).eval_problems(split, 300)
    again = ArithTask(task_cfg).eval_problems(split, 300)  # a second instance: same problems, same order
    assert problems == again
    assert len(problems) == 300
    assert len({p.question for p in problems}) == 300
    low, high = task_cfg[ops_key]
    assert all(low <= p.n_ops <= high for p in problems)
    assert all(len(parse(p.question)[1]) == p.n_ops for p in problems)
    for p in problems[:50]:
        check_trace(p.question, p.trace, p.answer, p.n_ops, task_cfg.modulus)
    if low < high:
        assert {p.n_ops for p in problems} == set(range(low, high + 1))


def test_eval_problems_do_not_depend_on_run_seed_or_other_streams(task_cfg):
    task = ArithTask(task_cfg)
    before = task.eval_problems("test", 50)
    take(task.sft_examples(7), 100)
    random.seed(99)
    assert task.eval_problems("test", 50) == before


def test_eval_problems_respect_custom_op_counts(task_cfg):
    task_cfg.test_ops = [2, 2]
    task_cfg.ood_ops = [6, 6]
    task = ArithTask(task_cfg)
    assert {p.n_ops for p in task.eval_problems("test", 100)} == {2}
    assert {p.n_ops for p in task.eval_problems("ood", 100)} == {6}


def test_pretrain_never_sees_multi_op_test_questions(task_cfg):
    problems = take(ArithTask(task_cfg).pretrain_problems(0), 5000)
    low, high = task_cfg.pretrain_ops
    assert {p.n_ops for p in problems} == set(range(low, high + 1))
    leaked = [p.question for p in problems if p.n_ops >= 2 and bucket(p.question) < 10]
    assert leaked == []


def all_one_op_questions(max_operand: int) -> set[str]:
    return {f"{a}{op}{b}=" for a in range(1, max_operand + 1) for op in "+-*" for b in range(1, max_operand + 1)}


def test_eval_problems_can_exhaust_a_small_space_exactly(task_cfg):
    task_cfg.test_ops = [1, 1]
    held_out = {q for q in all_one_op_questions(task_cfg.max_operand) if bucket(q) < 10}
    assert 5 < len(held_out) < 100
    problems = ArithTask(task_cfg).eval_problems("test", len(held_out))
    assert {p.question for p in problems} == held_out


def test_eval_problems_raise_when_asking_for_more_than_exist(task_cfg):
    task_cfg.test_ops = [1, 1]
    held_out = {q for q in all_one_op_questions(task_cfg.max_operand) if bucket(q) < 10}
    with pytest.raises(ValueError, match="distinct held-out"):
        ArithTask(task_cfg).eval_problems("test", 500)
    with pytest.raises(ValueError):
        ArithTask(task_cfg).eval_problems("test", len(held_out) + 1)
