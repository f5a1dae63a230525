"""How a task's prompts reach the model: in the tokenizer's chat template, or as plain text."""

from __future__ import annotations

from typing import Callable


def prompt_formatter(tokenizer, use_chat_template: bool) -> Callable[[str | list[dict]], str]:
    """The prompt as the model should see it: a question text becomes one user turn of the tokenizer's chat
    template, a list of {role, content} messages (conversational rows, a system prompt) that conversation, with
    the assistant turn opened; a text stays as it is when the tokenizer has no template (or
    task.chat_template=false), and messages then exit 2. The template's leading BOS text is dropped when the
    tokenizer adds BOS itself, so prompts never start with two."""
    if not (use_chat_template and getattr(tokenizer, "chat_template", None)):
        return plain_prompt
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def format_prompt(prompt: str | list[dict]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered[len(bos) :] if adds_bos and rendered.startswith(bos) else rendered

    return format_prompt


def prompts_use_chat_template(task_cfg) -> bool:
    """Whether the task puts its prompts in the tokenizer's chat template (when the tokenizer has one, as
    prompt_formatter does): dataset and wordmath tasks with task.chat_template; the built-in arith task's prompts
    are always plain. The policy's end tokens then include the template's turn end (core/end_tokens)."""
    return task_cfg.name != "arith" and bool(task_cfg.chat_template)


def plain_prompt(prompt: str | list[dict]) -> str:
    """A prompt without a chat template: the text as it is; messages have no plain form to fall back on."""
    if isinstance(prompt, str):
        return prompt
    from bridgectl.errors import UserError

    raise UserError(
        "conversational rows and task.system_prompt need the tokenizer's chat template, and there is "
        "none (or task.chat_template=false)",
        "use a model whose tokenizer has a chat template, or rows with a plain question field",
    )
