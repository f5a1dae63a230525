"""A trained reward model as one of `task.reward_funcs`: a sequence-classification model directory (or a cached
Hugging Face id) given where a function's `path.py:function` would go, as TRL's GRPOTrainer takes a model id in
`reward_funcs` (trl/trainer/grpo_trainer.py: AutoModelForSequenceClassification with num_labels=1, its own
tokenizer, scoring prompt + completion, the logit of label 0 as the reward).

    task.reward_funcs=[verifier,/models/my-reward-model] task.reward_weights=[1.0,0.1]

Scored as TRL scores: plain prompts as the text `prompt + completion`; conversational ones (dataset tasks with
model=hf and a chat template) as the reward tokenizer's chat template applied to the prompt's messages followed by
the assistant's completion; tokenized without special tokens and right-padded (a tokenizer without a pad token pads
with its EOS, as TRL). Its mean is logged as train/rewards/<directory name>, TRL's name for it.

It runs where user functions run, in the reward worker process (tasks/rewards.py), so task.reward_timeout_s bounds
each step's scoring and a crash in it names it. Its weights are loaded once, when that process starts (not counted
in a step's limit), on the run's GPU when there is one (the process's LOCAL_RANK under --nproc), else the CPU;
the trainer itself only reads its config, to refuse a directory that holds no sequence-classification model before
the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from bridgectl.errors import UserError

SCORING_ROWS = 16
"""Rows scored per forward pass (a bound on the reward model's activation memory; rows are right-padded, so the
scores do not depend on it beyond float rounding)."""


def is_reward_model_spec(spec: str) -> bool:
    """A task.reward_funcs entry names a reward model when it has no `:function` part (and is not `verifier`)."""
    return ":" not in spec and spec != "verifier"


class RewardModel:
    """A reward function f(prompts, completions, **kwargs) -> one float per completion, from a sequence-classification
    model. Construction reads only the model's config (cheap, in the trainer); `prepare()` loads the weights (in the
    reward worker, before its first step)."""

    def __init__(self, location: str) -> None:
        from transformers import AutoConfig

        self.location = location
        path = Path(location).expanduser()
        source = str(path.resolve()) if path.exists() else location
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise UserError(
                f"task.reward_funcs: '{location}' is neither a path.py:function nor a model directory "
                f"that loads ({type(error).__name__}: {str(error).splitlines()[0]})",
                "give a reward function as path/to/file.py:function or pkg.module:function, or a "
                "sequence-classification model directory (saved with save_pretrained)",
            ) from None
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise UserError(
                f"task.reward_funcs: {location} is not a sequence-classification model (its "
                f"architectures: {', '.join(architectures) or 'none recorded'})",
                "a reward model is an AutoModelForSequenceClassification with one label, trained to "
                "score completions; a causal LM's directory would give untrained scores",
            )
        self.source = source
        self.__name__ = Path(source).name or location  # train/rewards/<name>, TRL's name for it
        self.model = self.tokenizer = None

    def prepare(self) -> None:
        """Loads the weights and tokenizer (once) on the GPU of this process when there is one, else the CPU."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                self.source, num_labels=1, dtype=torch.bfloat16 if cuda else torch.float32
            )
            .to(self.device)
            .eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the model finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def texts(self, prompts: list, completions: list) -> list[str]:
        """What is scored, as TRL builds it: prompt + completion, or the chat template over the messages."""
        if prompts and isinstance(prompts[0], list):  # conversational: the completion is an assistant message list
            return [
                self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
                for prompt, completion in zip(prompts, completions)
            ]
        return [prompt + completion for prompt, completion in zip(prompts, completions)]

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        import torch

        self.prepare()
        texts, scores = self.texts(prompts, completions), []
        for start in range(0, len(texts), SCORING_ROWS):
            encoded = self.tokenizer(
                texts[start : start + SCORING_ROWS],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            ).to(self.device)
            with torch.inference_mode():
                scores += self.model(**encoded).logits[:, 0].float().tolist()
        return scores
