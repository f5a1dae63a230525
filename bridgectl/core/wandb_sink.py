"""W&B as a view of the run directory (`tracker.wandb.mode=online|offline`): the run is named after the run directory,
grouped by sweep study (else recipe), tagged with recipe, task and model; it gets the full config, every metric row
metrics.jsonl gets, a table of sampled completions with their rewards, and the final summary. Secrets never reach
it: strings are passed through `redact` (values of environment variables named like keys, tokens or passwords)."""

from __future__ import annotations

import os
import re

from bridgectl.errors import UserError

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary text


def redact(value):
    """`value` with every occurrence of a secret environment variable's value replaced by `***`, recursively
    through dicts and lists."""
    secrets = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH]
    if not secrets:
        return value

    def scrub(item):
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, "***")
            return item
        if isinstance(item, dict):
            return {key: scrub(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [scrub(inner) for inner in item]
        return item

    return scrub(value)


class WandbSink:
    def __init__(self, wandb_cfg, run_name: str, config: dict, tags: dict | None, directory) -> None:
        import wandb

        tags = tags or {}
        group = wandb_cfg.group or tags.get("study") or config["recipe"]["name"]
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, name=run_name,
                group=group, tags=[f"recipe:{config['recipe']['name']}", f"task:{config['task']['name']}",
                                   f"model:{config['model']['name']}"],
                config=redact(config), dir=str(directory), job_type="train", reinit="create_new",
                settings=wandb.Settings(console="off", save_code=False, x_disable_meta=True))
        except Exception as error:  # no credentials for online mode, no network, a bad entity
            raise UserError(f"W&B could not start a run: {type(error).__name__}: {error}",
                            "run `wandb login` (or set WANDB_API_KEY), or use tracker.wandb.mode=offline") from None
        self._completions = []

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        self._completions += [redact({"step": step, **row}) for row in rows]

    def finish(self, summary: dict) -> None:
        columns = ["step", "split", "prompt", "completion", "reward", "gold"]
        if self._completions:
            table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns]
                                                             for row in self._completions])
            self.run.log({"completions": table})
        for key, value in redact(summary).items():
            if isinstance(value, (int, float, str, bool, dict, list)):
                self.run.summary[key] = value
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
