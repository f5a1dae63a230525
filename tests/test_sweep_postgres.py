"""A study shared through a real PostgreSQL server (tests/postgres.py starts one from the Debian package): two
`bridgectl sweep` commands with `--workers 2` each on one 4-point grid run every point exactly once, and a worker
SIGKILLed mid-trial is reported and its trial run again, continuing its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from optuna.trial import TrialState
from postgres import postgres_server
from test_sweep import described, end_group, start_sweep, write_spec

from bridgectl.sweep import claims as sweep_claims
from bridgectl.sweep import spec as sweep_spec
from bridgectl.sweep import study as sweep

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

BASE = (
    "[recipe=rl, train.max_steps=4, train.checkpoint_every=2, rl.prompts_per_step=2, rl.num_generations=2, "
    "eval.n=8, train.threads=1]"
)
RATES = [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]


def test_two_sweep_commands_with_two_workers_each_run_a_grid_once_on_postgresql(tmp_path):
    spec_path = write_spec(
        tmp_path,
        f"name: pg\nbase: {BASE}\nsampler: grid\n"
        "params:\n  rl.lr: {type: float, values: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]}\n",
    )
    spec, sweep_dir = sweep_spec.load_spec(spec_path), tmp_path / "out" / "pg"
    with postgres_server() as url:
        commands = [start_sweep(spec_path, tmp_path / "out", "--storage", url, "--workers", "2") for _ in range(2)]
        try:
            deadline = time.monotonic() + 300
            victim = None
            while victim is None:  # a worker process (not a sweep command) whose run has checkpointed
                ended = [c for c in commands if c.poll() is not None]
                assert not ended, "a sweep ended before any kill:\n" + ended[0].communicate()[0]
                assert time.monotonic() < deadline, "no run checkpointed in time"
                time.sleep(0.1)
                for run_dir in sweep_dir.glob("trial-*-seed0"):
                    if not list((run_dir / "checkpoints").glob("step-*")):
                        continue
                    trial = sweep.make_study(spec, sweep_dir, sweep.storage_url(url, 2)).trials[
                        int(run_dir.name.split("-")[1])
                    ]
                    pid = (trial.system_attrs.get("heartbeat") or {}).get("pid")
                    if trial.state == TrialState.RUNNING and pid not in (None, *(c.pid for c in commands)):
                        victim = trial
                        os.kill(pid, signal.SIGKILL)
                        break
            outputs = [command.communicate(timeout=300)[0] for command in commands]
        finally:
            for command in commands:
                end_group(command)
        said = described(commands, outputs)
        assert [command.returncode for command in commands] == [0, 0], said
        killed = victim.system_attrs["heartbeat"]["pid"]
        assert f"(pid {killed}) was killed by SIGKILL while running trial {victim.number}" in " ".join(said.split())
        study = sweep.make_study(spec, sweep_dir, sweep.storage_url(url, 2))
        ran = [t for t in study.trials if not sweep_claims.is_disposed(t)]
        completed = sorted(t.params["rl.lr"] for t in ran if t.state == TrialState.COMPLETE)
        assert completed == RATES, said  # every point exactly once
        failed = [t for t in ran if t.state == TrialState.FAIL]
        assert [t.number for t in failed] == [victim.number], said  # the killed trial alone, retried
        retry = next(t for t in ran if t.user_attrs.get("retry_of") == victim.number)
        assert retry.state == TrialState.COMPLETE and retry.params == victim.params
        # the retry took the killed trial's run over (continued from its checkpoint, or kept as it was when the
        # run had just completed before the kill): one history from step 0, no step twice
        retried = sweep_dir / f"trial-{retry.number:03d}-seed0"
        assert not (sweep_dir / f"trial-{victim.number:03d}-seed0").exists()
        summary = json.loads((retried / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["trial"] == retry.number
        steps = [json.loads(line)["step"] for line in (retried / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 4 and steps.count(1) == 1
        assert not any(t.state == TrialState.RUNNING for t in study.trials)
