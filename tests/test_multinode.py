"""A run over two "nodes": two `python -m bridgectl run --nnodes 2 --nproc 1 --rdzv-endpoint 127.0.0.1:PORT`
commands on this host, meeting at torchrun's c10d rendezvous (gloo), as two machines would. The run equals the
single-process run (losses, rewards, evaluations, final weights, to float rounding); a name already taken stops
both nodes with exit 2 and the same Error:, the existing run untouched. A node SIGKILLed mid-run (rank 0's or the
other) ends the other node within seconds, and the run resumed on both nodes ends as the uninterrupted run; a
rank that fails mid-training ends every node with exit 1, rank 0's summary naming that rank's error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_distributed import SMALL, rows, weights
from typer.testing import CliRunner

from bridgectl.cli.app import app

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(
    settings: list[str], out, name: str, directories=(None, None), env: dict | None = None
) -> list[subprocess.CompletedProcess]:
    """Both nodes' commands, started together (in `directories`, when given: a relative --out is then a
    different directory on each node); each one's exit status and output."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bridgectl",
        "run",
        *settings,
        "--nnodes",
        "2",
        "--nproc",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--out",
        str(out),
        "--name",
        name,
    ]
    nodes = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=directory,
            env={**os.environ, **(env or {})},
        )
        for directory in directories
    ]
    done = []
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(command, node.returncode, output))
    return done


def assert_same_training(one: Path, two: Path) -> None:
    """The run `two` (two nodes) logged the same steps, losses, rewards and evaluations as `one` (one process)
    and ended with the same weights, to float rounding."""
    first, second = rows(one), rows(two)
    assert [r["step"] for r in first] == [r["step"] for r in second]
    for a, b in zip(first, second):
        # (not the FLOPs: each process pads its own rows, so two count fewer padded positions than one)
        for key in (
            "train/rl_loss",
            "train/reward_mean",
            "train/grad_norm",
            "eval/test/accuracy",
            "eval/ood/accuracy",
            "compute/gen_tokens",
            "compute/pass_tokens",
        ):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys() and w1
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)


@contextlib.contextmanager
def nodes_running(args: list[str], logs: Path):
    """Both nodes' commands (`bridgectl run ARGS --nnodes 2 --nproc 1 --rdzv-endpoint ...`), started together,
    each in a session of its own (kill_node), its output in `logs`-0.log and `logs`-1.log (files, not pipes: a
    node never blocks on output nobody reads while the test waits for something else). Whatever is still running
    when the block ends is SIGKILLed: a failing test leaves no node behind."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bridgectl",
        "run",
        *args,
        "--nnodes",
        "2",
        "--nproc",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
    ]
    nodes = []
    try:
        for index in range(2):
            with open(f"{logs}-{index}.log", "w") as log:
                nodes.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy()
                    )
                )
            nodes[-1].log = Path(f"{logs}-{index}.log")
        yield nodes
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL to the node's whole process tree, as when its machine dies: the command's process group (it and
    torchrun) and the group of each process below it (torchrun starts its worker in a session of its own, which
    a SIGKILLed torchrun leaves running), once all of them have ended."""
    below = []
    with contextlib.suppress(psutil.Error):
        below = psutil.Process(node.pid).children(recursive=True)
    for pid in [node.pid, *(process.pid for process in below)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != os.getpgrp():  # never the test's own group
                os.killpg(group, signal.SIGKILL)
    node.wait(30)
    _, alive = psutil.wait_procs(below, timeout=30)
    assert not alive, alive


def outputs(nodes) -> str:
    return "\n".join(
        f"--- node {index} (exit {node.returncode}):\n{node.log.read_text()}" for index, node in enumerate(nodes)
    )


def wait_until(condition, nodes, what: str, timeout: float) -> None:
    """Polls `condition()` until it holds; fails when a node ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if any(node.poll() is not None for node in nodes):
            raise AssertionError(f"a node ended before {what}:\n{outputs(nodes)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{outputs(nodes)}")
        time.sleep(0.02)


def ended(nodes, timeout: float) -> list[int]:
    """Each node's exit status, once every node has ended by itself within `timeout` seconds (together); a node
    still running then fails the test (and is killed as the block of nodes_running ends)."""
    deadline = time.monotonic() + timeout
    for index, node in enumerate(nodes):
        try:
            node.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {index} did not end within {timeout} s:\n{outputs(nodes)}") from None
    return [node.returncode for node in nodes]


def worker_rank(node: subprocess.Popen) -> int | None:
    """The RANK torchrun gave the node's worker at the rendezvous (None before it has started one)."""
    try:
        for process in psutil.Process(node.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "RANK" in (environment := process.environ()):
                    return int(environment["RANK"])
    except psutil.Error:
        pass
    return None


def test_two_nodes_train_as_one_process_and_a_taken_name_stops_both(tmp_path):
    settings = ["recipe=rl", *SMALL]
    single = CliRunner().invoke(app, ["run", *settings, "--out", str(tmp_path), "--name", "one"])
    assert single.exit_code == 0, single.output
    nodes = two_nodes(settings, tmp_path, "two")
    assert [node.returncode for node in nodes] == [0, 0], [node.stdout for node in nodes]

    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert not list((tmp_path / "two").glob(".ranks-see-this"))  # the visibility check left nothing behind

    before = (tmp_path / "two" / "summary.json").read_text()
    again = two_nodes(settings, tmp_path, "two")
    assert [node.returncode for node in again] == [2, 2], [node.stdout for node in again]
    for node in again:
        assert "already exists" in " ".join(node.stdout.split()), node.stdout
    assert (tmp_path / "two" / "summary.json").read_text() == before
    assert json.loads(before)["status"] == "completed"


def test_nnodes_needs_a_name_and_an_endpoint(tmp_path):
    for extra, said in [
        (["--rdzv-endpoint", "127.0.0.1:29500"], "--nnodes needs --name"),
        (["--name", "x"], "--nnodes needs --rdzv-endpoint"),
    ]:
        result = CliRunner().invoke(app, ["run", "recipe=rl", "--nnodes", "2", *extra, "--out", str(tmp_path)])
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not list(tmp_path.iterdir())


def test_a_node_that_cannot_see_the_run_directory_stops_both_within_seconds(tmp_path):
    """--out relative to each node's own working directory: two directories, as two machines without a shared
    file system would have. The rank that cannot see rank 0's directory names its host, both nodes exit 2, and
    rank 0 gives its claimed directory back."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    nodes = two_nodes(
        ["recipe=rl", *SMALL],
        "runs",
        "x",
        directories=(a, b),
        env={"BRIDGECTL_NODE_WAIT_S": "3", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert [node.returncode for node in nodes] == [2, 2], [node.stdout for node in nodes]
    for node in nodes:
        assert "is not visible from" in " ".join(node.stdout.split()), node.stdout
    assert not (a / "runs" / "x").exists() and not (b / "runs" / "x").exists()


RESUMABLE = [
    *(s for s in SMALL if not s.startswith(("train.max_steps=", "train.checkpoint_every="))),
    "train.max_steps=4",
    "train.checkpoint_every=1",
]
"""SMALL with a checkpoint after every step, one step more (something is left to do once step 1's is written)."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The single-process run of RESUMABLE, once for both kill tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    single = CliRunner().invoke(app, ["run", "recipe=rl", *RESUMABLE, "--out", str(out), "--name", "one"])
    assert single.exit_code == 0, single.output
    return out / "one"


@pytest.mark.parametrize("killed_rank", [0, 1])
def test_a_node_killed_mid_run_stops_the_other_and_both_resume_to_the_uninterrupted_result(
    tmp_path, killed_rank, uninterrupted
):
    """SIGKILL one node's whole process tree (the one whose worker is rank 0: the run directory's writer; or the
    other) once the run has a checkpoint: the other node ends by itself, non-zero, within 90 s, and
    `bridgectl run --resume RUN --nnodes 2` on both nodes finishes the run with the metrics and weights of a
    single process that was never stopped."""
    settings = ["recipe=rl", *RESUMABLE]
    run = tmp_path / "two"
    with nodes_running([*settings, "--out", str(tmp_path), "--name", "two"], tmp_path / "first") as nodes:
        ranks = []  # the rank of each node's worker, once both have one

        def both_started() -> bool:
            ranks[:] = [worker_rank(node) for node in nodes]
            return None not in ranks

        wait_until(both_started, nodes, "worker on each node", 120)
        assert sorted(ranks) == [0, 1]
        wait_until(lambda: any((run / "checkpoints").glob("step-*")), nodes, "checkpoint", 120)
        victim = ranks.index(killed_rank)
        kill_node(nodes[victim])
        codes = ended(nodes, timeout=90)
    assert codes[victim] == -signal.SIGKILL
    assert codes[1 - victim] not in (0, None), outputs(nodes)
    assert not (run / "checkpoints" / "final").exists()  # stopped before the end
    summary = json.loads((run / "summary.json").read_text())
    # rank 0 killed: no goodbye; rank 0 survived: it says the run failed
    assert summary["status"] == ("running" if killed_rank == 0 else "failed"), summary

    with nodes_running(["--resume", str(run)], tmp_path / "resumed") as nodes:
        codes = ended(nodes, timeout=180)
    assert codes == [0, 0], outputs(nodes)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4, summary
    assert 1 <= summary["resumed_from_step"] < 4
    assert_same_training(uninterrupted, run)


def test_a_rank_failing_mid_training_ends_every_node_with_its_status(tmp_path):
    """A reward function that raises on rank 1 alone, at step 2 (step 1 trained and checkpointed): both nodes'
    commands exit 1 within seconds, and the run directory (rank 0's) is kept, status failed, naming the error."""
    rewards = tmp_path / "rank_rewards.py"
    rewards.write_text(
        textwrap.dedent("""
        import os

        calls = []

        def fails_on_rank_1(prompts, completions, **kwargs):
            calls.append(1)
            if os.environ.get("RANK") == "1" and len(calls) == 2:
                raise ValueError("rank 1 cannot score this batch")
            return [0.0] * len(completions)
        """)
    )
    run = tmp_path / "two"
    settings = ["recipe=rl", *RESUMABLE, f"task.reward_funcs=[verifier,{rewards}:fails_on_rank_1]"]
    with nodes_running([*settings, "--out", str(tmp_path), "--name", "two"], tmp_path / "node") as nodes:
        codes = ended(nodes, timeout=120)
    assert codes == [1, 1], outputs(nodes)
    assert run.is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    # rank 0 itself saw only its collective's peer go ("Connection closed by peer"): the cause is rank 1's
    said = "step 2 (rl): reward function fails_on_rank_1 raised ValueError: rank 1 cannot score this batch"
    assert summary["error"] == f"RewardFunctionError: {said} (on rank 1)", summary
    assert any(said in " ".join(node.log.read_text().split()) for node in nodes), outputs(nodes)
    assert max(r["step"] for r in rows(run)) == 1
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000001"]
