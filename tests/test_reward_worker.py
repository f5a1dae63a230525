"""task.reward_funcs run in a worker process (tasks/rewards.py, RewardWorker): a call past task.reward_timeout_s is
killed even when it holds the GIL, and the run fails naming the function; a function cannot move the trainer's
working directory; NaN, infinities and non-numbers fail naming the function, the value and the completion; the
values are those of calling the function directly; one worker serves every step and a dead one is replaced."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import Config, compose
from bridgectl.tasks.data import Problem
from bridgectl.tasks.rewards import RewardFunctionError, StepReward, checked_values
from bridgectl.training.runner import run

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

SMALL = [
    "recipe=rl",
    "train.threads=1",
    "train.max_steps=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "eval.n=8",
    "train.eval_every=0",
    "rl.max_completion_length=24",
]
CATASTROPHIC = "re.match(r'(a+)+$', 'a' * 32 + 'b')"  # 2^32 backtracking steps inside re's C code, GIL held
BRIDGECTL = str(Path(sys.executable).parent / "bridgectl")


@pytest.fixture(autouse=True)
def _no_test_hangs():
    """Fails a test still running after 120 s (pytest-timeout is not installed). The trainer only ever waits on
    the worker in select(), so SIGALRM's handler gets to run; the CLI tests run in subprocesses with timeouts."""

    def expire(signum, frame):
        raise TimeoutError("test ran past 120 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 120)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


class _Verifier:
    """A stand-in task whose verifier says 1.0 when the completion equals the gold answer."""

    @staticmethod
    def rewards(completions, golds):
        return [float(c == g) for c, g in zip(completions, golds)]


def step_reward(funcs: list[str], weights: list[float] | None = None, timeout_s: float = 10.0) -> StepReward:
    cfg = OmegaConf.structured(Config).task
    cfg.reward_funcs, cfg.reward_weights, cfg.reward_timeout_s = funcs, weights, timeout_s
    return StepReward(_Verifier(), cfg)


PROBLEMS = [Problem("2+2=", "", "4", columns={"level": 1}), Problem("3+3=", "", "6", columns={"level": 2})]
COMPLETIONS = ["4", "five"]


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a dead worker nobody has reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def wait_for(path: Path, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {seconds} s")


def cli(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real `bridgectl run` in a subprocess, which `timeout` kills should anything hang."""
    return subprocess.run(
        [BRIDGECTL, "run", *SMALL, *args, "--out", str(tmp_path / "runs"), "--name", "r"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def summary_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())


def regex_reward(tmp_path: Path) -> Path:
    """A reward that writes "<worker pid> <time>" to started.txt, then runs the catastrophic regex."""
    return write(
        tmp_path / "regex_rewards.py",
        f"""
        import os, re, time

        def catastrophic(prompts, completions, **kwargs):
            with open({str(tmp_path / "started.txt")!r}, "w") as out:
                out.write(f"{{os.getpid()}} {{time.time()}}\\n")
            {CATASTROPHIC}
            return [0.0] * len(completions)
        """,
    )


# ---- timeouts ---------------------------------------------------------------------------------------------------
def test_a_regex_holding_the_gil_is_killed_at_the_timeout_and_the_run_fails_naming_it(tmp_path):
    """The issue's reward with task.reward_timeout_s=2: the CLI exits 1 within a few seconds of the call's start,
    summary.json says failed with the function, the limit and the step, and the worker that ran it is gone."""
    file = regex_reward(tmp_path)
    result = cli(tmp_path, f"task.reward_funcs=[verifier,{file}:catastrophic]", "task.reward_timeout_s=2")
    ended = time.time()
    assert result.returncode == 1, result.stdout + result.stderr
    worker_pid, started = (tmp_path / "started.txt").read_text().split()
    assert 2.0 <= ended - float(started) < 2.0 + 8.0  # the limit, plus writing the summary and exiting
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed"
    assert summary["error"] == (
        "RewardFunctionError: step 1 (rl): reward function catastrophic did not return within task.reward_timeout_s=2 s"
    )
    assert "catastrophic did not return" in " ".join((result.stdout + result.stderr).split())
    assert not alive(int(worker_pid))


def test_sigterm_stops_a_run_whose_reward_holds_the_gil(tmp_path):
    """The issue's other half: with a long limit, the first SIGTERM asks for a stop after the step and the second
    stops at once, although the reward still spins: status interrupted, the worker killed."""
    file = regex_reward(tmp_path)
    process = subprocess.Popen(
        [
            BRIDGECTL,
            "run",
            *SMALL,
            f"task.reward_funcs=[{file}:catastrophic]",
            "task.reward_timeout_s=600",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "r",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        worker_pid = int(wait_for(tmp_path / "started.txt", 100).split()[0])
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode != 0, output
    assert summary_of(tmp_path)["status"] == "interrupted", output
    assert not alive(worker_pid)


def test_a_timed_out_worker_is_killed_within_the_limit_and_the_next_call_gets_a_new_one(tmp_path):
    marker = tmp_path / "hung-once"
    file = write(
        tmp_path / "once.py",
        f"""
        import os, re

        def hangs_once(prompts, completions, **kwargs):
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                {CATASTROPHIC}
            return [float(os.getpid())] * len(completions)
        """,
    )
    reward = step_reward([f"{file}:hangs_once"], timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(
        RewardFunctionError,
        match=r"^reward function hangs_once did not return within "
        r"task.reward_timeout_s=1.5 s$",
    ):
        reward(PROBLEMS, COMPLETIONS)
    assert 1.5 <= time.monotonic() - started < 1.5 + 3.0
    assert reward.worker.pid is None  # killed
    total, _, _ = reward(PROBLEMS, COMPLETIONS)
    assert total == [float(reward.worker.pid)] * 2
    reward.close()


def test_the_trainer_dying_mid_call_takes_the_worker_with_it(tmp_path):
    """SIGKILL of the trainer while its reward spins in C code: the kernel kills the worker (PR_SET_PDEATHSIG), so
    no orphan burns a core."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    file = regex_reward(tmp_path)
    script = textwrap.dedent(f"""
        from omegaconf import OmegaConf
        from bridgectl.config.compose import Config
        from bridgectl.tasks.data import Problem
        from bridgectl.tasks.rewards import StepReward

        cfg = OmegaConf.structured(Config).task
        cfg.reward_funcs, cfg.reward_timeout_s = [{str(file)!r} + ":catastrophic"], 600
        StepReward(None, cfg)([Problem("q", "", "1")], ["1"])
        """)
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    try:
        worker_pid = int(wait_for(tmp_path / "started.txt", 60).split()[0])
        assert alive(worker_pid)
    finally:
        trainer.kill()
        trainer.wait(10)
    deadline = time.monotonic() + 5
    while alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker_pid)


# ---- the working directory --------------------------------------------------------------------------------------
def test_a_reward_that_changes_directory_leaves_the_run_where_it_was_asked(tmp_path, monkeypatch):
    """os.chdir('/') in the reward moves the worker alone: with a relative --out the checkpoints and the summary
    are in the run directory, and the trainer's cwd is unchanged."""
    monkeypatch.chdir(tmp_path)
    file = write(
        tmp_path / "wanders.py",
        """
        import os

        def wanders(prompts, completions, **kwargs):
            os.chdir("/")
            return [0.0] * len(completions)
        """,
    )
    result = CliRunner().invoke(
        app,
        [
            "run",
            *SMALL,
            f"task.reward_funcs=[verifier,{file}:wanders]",
            "train.checkpoint_every=1",
            "--out",
            "runs",
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    assert os.getcwd() == str(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    assert summary_of(tmp_path)["status"] == "completed"
    assert (run_dir / "checkpoints" / "step-000001").is_dir() and (run_dir / "checkpoints" / "final").is_dir()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # init, 2 steps, final


def test_a_relative_run_path_is_made_absolute_before_anything_can_change_the_cwd(tmp_path, monkeypatch):
    """The runner resolves the run path once: code in the trainer itself that changes directory mid-run (here the
    evaluation callback) does not move the checkpoints or the summary."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    cfg = compose([o for o in SMALL if not o.startswith("train.eval_every=")] + ["train.eval_every=1"])
    summary = run(
        cfg, Path("runs/r"), show_progress=False, on_eval=lambda step, metrics: os.chdir(tmp_path / "elsewhere")
    )
    assert summary["status"] == "completed" and os.getcwd() == str(tmp_path / "elsewhere")
    run_dir = tmp_path / "runs" / "r"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "final").is_dir()
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ---- values -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, shown, reason",
    [
        ("float('inf')", "inf", "not a finite number"),
        ("float('-inf')", "-inf", "not a finite number"),
        ("float('nan')", "nan", "not a finite number"),
        ("10 ** 400", "1" + "0" * 76 + "...", "not a finite number"),
        ("'1.0'", "'1.0'", "not a number or None"),
        ("[1.0]", "[1.0]", "not a number or None"),
        ("1j", "1j", "not a number or None"),
    ],
)
def test_a_bad_value_fails_naming_the_function_the_value_and_the_completion(tmp_path, value, shown, reason):
    """The second completion's value is bad: refused as it is, not parsed or turned into None."""
    file = write(
        tmp_path / "bad.py",
        f"""
        def bad(prompts, completions, **kwargs):
            return [0.5, {value}]
        """,
    )
    reward = step_reward(["verifier", f"{file}:bad"])
    with pytest.raises(RewardFunctionError) as raised:
        reward(PROBLEMS, COMPLETIONS)
    assert str(raised.value).startswith(f"reward function bad returned {shown} for completion 1, {reason}")
    reward.close()


def test_what_counts_as_a_number():
    """int, float, bool (True is 1.0, as TRL's torch.tensor makes it), numpy scalars and fractions are numbers;
    None stays None ("does not apply")."""
    values = [1, 0.25, True, False, np.float32(0.5), np.int64(3), np.bool_(True), Fraction(1, 4), None]
    assert checked_values("f", values, len(values)) == [1.0, 0.25, 1.0, 0.0, 0.5, 3.0, 1.0, 0.25, None]
    for returned in ("0101", {"a": 1.0}):  # not a list of values, though list() would make one
        with pytest.raises(RewardFunctionError, match=f"returned a {type(returned).__name__}, not a list of 4"):
            checked_values("f", returned, 4)


def test_an_infinite_reward_fails_the_run_at_its_step_naming_the_function(tmp_path):
    """Instead of a NaN gradient norm steps later: status failed, the function, the value and the completion."""
    file = write(
        tmp_path / "infinite.py",
        """
        def infinite(prompts, completions, **kwargs):
            return [float("inf")] * len(completions)
        """,
    )
    result = CliRunner().invoke(
        app,
        [
            "run",
            *SMALL,
            f"task.reward_funcs=[verifier,{file}:infinite]",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 1, result.output
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed"
    assert summary["error"].startswith(
        "RewardFunctionError: step 1 (rl): reward function infinite returned inf for completion 0, not a finite number"
    )
    assert "gradients" not in summary["error"]


def test_the_worker_gives_exactly_the_values_of_calling_the_function_directly(tmp_path):
    """Same keyword arguments (prompts, completions, every column; conversational rows as messages), same values,
    bit for bit, in the weighted sum and the means."""
    file = write(
        tmp_path / "shaped.py",
        """
        def shaped(prompts, completions, level, **kwargs):
            text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
            return [len(t) / 7 + 0.1 * lv + (0.3 if isinstance(p, list) else 0.0) if t != "skip" else None
                    for p, t, lv in zip(prompts, text, level)]
        """,
    )
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "5+5="}]
    problems = [
        *PROBLEMS,
        Problem("5+5=", "", "10", conversation=chat, columns={"level": 3}),
        Problem("1+1=", "", "2", columns={"level": 4}),
    ]
    completions = ["4", "five", "ten, I think", "skip"]
    spec = importlib.util.spec_from_file_location("shaped_direct", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    direct = module.shaped(
        prompts=["2+2=", "3+3=", chat, "1+1="],
        completions=["4", "five", [{"role": "assistant", "content": "ten, I think"}], "skip"],
        level=[1, 2, 3, 4],
    )
    reward = step_reward(["verifier", f"{file}:shaped"], [1.0, 0.3])
    total, means, verdicts = reward(problems, completions)
    shaped = [0.0 if v is None else v for v in direct]
    assert direct[3] is None and verdicts == [1.0, 0.0, 0.0, 0.0]
    assert total == [1.0 * v + 0.3 * s for v, s in zip(verdicts, shaped)]
    assert means == {"verifier": 0.25, "shaped": sum(shaped) / 4}
    reward.close()


# ---- the worker process -----------------------------------------------------------------------------------------
def test_one_worker_serves_every_call_and_a_killed_one_is_replaced(tmp_path):
    """A reward that returns its process id: the same, not the trainer's, across calls (and both functions of a
    call run in it); after SIGKILL the next call runs in a new process and still answers."""
    file = write(
        tmp_path / "pid.py",
        """
        import os

        def pid(prompts, completions, **kwargs):
            return [float(os.getpid())] * len(completions)

        def pid_again(prompts, completions, **kwargs):
            return [float(os.getpid())] * len(completions)
        """,
    )
    reward = step_reward([f"{file}:pid", f"{file}:pid_again"], [1.0, 0.0])
    first, means, _ = reward(PROBLEMS, COMPLETIONS)
    second, _, _ = reward(PROBLEMS, COMPLETIONS)
    worker = reward.worker.pid
    assert first == second == [float(worker)] * 2 and means["pid_again"] == worker and worker != os.getpid()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:  # killed between two steps (the OOM killer, say)
        time.sleep(0.01)
    third, _, _ = reward(PROBLEMS, COMPLETIONS)
    assert reward.worker.pid not in (None, worker) and third == [float(reward.worker.pid)] * 2
    reward.close()
    assert reward.worker.pid is None


def test_a_function_that_ends_the_worker_fails_naming_it_and_the_next_call_starts_another(tmp_path):
    marker = tmp_path / "exited-once"
    file = write(
        tmp_path / "quits.py",
        f"""
        import os

        def quits(prompts, completions, **kwargs):
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                os._exit(3)
            return [1.0] * len(completions)
        """,
    )
    reward = step_reward([f"{file}:quits"])
    with pytest.raises(
        RewardFunctionError,
        match=r"^reward function quits ended the reward worker process "
        r"\(exit code 3\)$",
    ):
        reward(PROBLEMS, COMPLETIONS)
    assert reward(PROBLEMS, COMPLETIONS)[0] == [1.0, 1.0]
    reward.close()


def test_a_raising_function_keeps_the_worker_and_its_state(tmp_path):
    """An exception is reported naming the function; the process survives it (module state included), so the
    following call is answered by the same worker."""
    file = write(
        tmp_path / "counts.py",
        """
        calls = []

        def counts(prompts, completions, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("bad row")
            return [float(len(calls))] * len(completions)
        """,
    )
    reward = step_reward([f"{file}:counts"])
    with pytest.raises(RewardFunctionError, match=r"^reward function counts raised ValueError: bad row$"):
        reward(PROBLEMS, COMPLETIONS)
    worker = reward.worker.pid
    assert reward(PROBLEMS, COMPLETIONS)[0] == [2.0, 2.0] and reward.worker.pid == worker
    reward.close()


def test_the_worker_imports_module_and_relative_file_specs_from_the_trainers_directory(tmp_path, monkeypatch):
    """`pkg.module:fn` and `relative/file.py:fn` are found as the trainer found them, and the worker runs in the
    directory they were loaded from."""
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path / "local_rewards_xyz.py",
        """
        import os

        def where(prompts, completions, **kwargs):
            return [float(os.getcwd() == os.path.dirname(os.path.abspath(__file__)))] * len(completions)
        """,
    )
    write(
        tmp_path / "sub" / "rel.py",
        """
        def half(prompts, completions, **kwargs):
            return [0.5] * len(completions)
        """,
    )
    reward = step_reward(["local_rewards_xyz:where", "sub/rel.py:half"])
    total, means, _ = reward(PROBLEMS, COMPLETIONS)
    assert means == {"where": 1.0, "half": 0.5} and total == [1.5, 1.5]
    reward.close()
    sys.modules.pop("local_rewards_xyz", None)
