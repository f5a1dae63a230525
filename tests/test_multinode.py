"""A run over two "nodes": two `python -m bridgectl run --nnodes 2 --nproc 1 --rdzv-endpoint 127.0.0.1:PORT`
commands on this host, meeting at torchrun's c10d rendezvous (gloo), as two machines would. The run equals the
single-process run (losses, rewards, evaluations, final weights, to float rounding); a name already taken stops
both nodes with exit 2 and the same Error:, the existing run untouched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bridgectl.cli import app
from test_distributed import SMALL, rows, weights


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(settings: list[str], out, name: str, directories=(None, None),
              env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Both nodes' commands, started together (in `directories`, when given: a relative --out is then a
    different directory on each node); each one's exit status and output."""
    port = free_port()
    command = [sys.executable, "-m", "bridgectl", "run", *settings, "--nnodes", "2", "--nproc", "1",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--out", str(out), "--name", name]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=directory,
                              env={**os.environ, **(env or {})}) for directory in directories]
    done = []
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(command, node.returncode, output))
    return done


def test_two_nodes_train_as_one_process_and_a_taken_name_stops_both(tmp_path):
    settings = ["recipe=rl", *SMALL]
    single = CliRunner().invoke(app, ["run", *settings, "--out", str(tmp_path), "--name", "one"])
    assert single.exit_code == 0, single.output
    nodes = two_nodes(settings, tmp_path, "two")
    assert [node.returncode for node in nodes] == [0, 0], [node.stdout for node in nodes]

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        # (not the FLOPs: each process pads its own rows, so two count fewer padded positions than one)
        for key in ("train/rl_loss", "train/reward_mean", "train/grad_norm", "eval/test/accuracy",
                    "eval/ood/accuracy", "compute/gen_tokens", "compute/pass_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys() and w1
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)
    assert not list((tmp_path / "two").glob(".ranks-see-this"))  # the visibility check left nothing behind

    before = (tmp_path / "two" / "summary.json").read_text()
    again = two_nodes(settings, tmp_path, "two")
    assert [node.returncode for node in again] == [2, 2], [node.stdout for node in again]
    for node in again:
        assert "already exists" in " ".join(node.stdout.split()), node.stdout
    assert (tmp_path / "two" / "summary.json").read_text() == before
    assert json.loads(before)["status"] == "completed"


def test_nnodes_needs_a_name_and_an_endpoint(tmp_path):
    for extra, said in [(["--rdzv-endpoint", "127.0.0.1:29500"], "--nnodes needs --name"),
                        (["--name", "x"], "--nnodes needs --rdzv-endpoint")]:
        result = CliRunner().invoke(app, ["run", "recipe=rl", "--nnodes", "2", *extra, "--out", str(tmp_path)])
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not list(tmp_path.iterdir())


def test_a_node_that_cannot_see_the_run_directory_stops_both_within_seconds(tmp_path):
    """--out relative to each node's own working directory: two directories, as two machines without a shared
    file system would have. The rank that cannot see rank 0's directory names its host, both nodes exit 2, and
    rank 0 gives its claimed directory back."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    nodes = two_nodes(["recipe=rl", *SMALL], "runs", "x", directories=(a, b),
                      env={"BRIDGECTL_NODE_WAIT_S": "3", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert [node.returncode for node in nodes] == [2, 2], [node.stdout for node in nodes]
    for node in nodes:
        assert "is not visible from" in " ".join(node.stdout.split()), node.stdout
    assert not (a / "runs" / "x").exists() and not (b / "runs" / "x").exists()
