"""The tokens that end a completion. Real models declare several: Qwen2.5-Instruct's generation config stops at
<|im_end|> and <|endoftext|>, Llama-3-Instruct's at three ids, and a base model prompted through a chat template
(Qwen2.5 base: tokenizer EOS <|endoftext|>) closes an assistant turn with a token that is not its EOS (<|im_end|>).
A sampler that stops only at the tokenizer's EOS runs such a model past its answer to the length limit.

`end_tokens_of` gathers them once, where the policy is loaded (core/model.load_policy, `Policy.end_tokens`), and
every consumer reads that one set: both samplers stop at any of its ids, completion masks and truncation flags cut
at the first of any kind (core/rollout), and `bridgectl export` writes it as the generation config's eos_token_id.
SFT and demonstration targets end with its `target`: the turn-end token when prompts use the chat template, the
EOS otherwise (core/losses.make_sft_batch).
"""

from __future__ import annotations

from dataclasses import dataclass

# text no template writes or rewrites, so that what follows it in the rendering is what closes the assistant turn
_MARKER = "bridgectl-answer-marker-7f3a9c"


@dataclass(frozen=True)
class EndTokens:
    ids: tuple[int, ...]
    """Every id that ends a completion, without repeats: the tokenizer's EOS, the generation config's, then the chat
    template's turn end (when prompts use the template)."""
    target: int
    """The id SFT and demonstration targets end with: the template's turn end when prompts use the template and it
    has one, else the tokenizer's EOS."""


def end_tokens_of(tokenizer, generation_config=None, chat_template: bool = False) -> EndTokens:
    """The end tokens of a model: `tokenizer.eos_token_id`, `generation_config.eos_token_id` (an int or a list;
    None or a missing config adds nothing), and with `chat_template` (prompts are put in the tokenizer's template,
    tasks.prompts_use_chat_template) the token that closes an assistant turn there (`turn_end_id`). A tokenizer
    without a template, or a template without such a token, adds nothing: the target is then the EOS."""
    declared = getattr(generation_config, "eos_token_id", None)
    declared = [declared] if isinstance(declared, int) else list(declared or [])
    turn_end = turn_end_id(tokenizer) if chat_template else None
    found = [tokenizer.eos_token_id, *declared, turn_end]
    ids = tuple(dict.fromkeys(int(i) for i in found if i is not None))
    target = turn_end if turn_end is not None else tokenizer.eos_token_id
    return EndTokens(ids=ids, target=target)


def eos_only(tokenizer) -> EndTokens:
    """The end tokens when nothing but the tokenizer is known: its EOS alone."""
    return end_tokens_of(tokenizer)


def turn_end_id(tokenizer) -> int | None:
    """The token the tokenizer's chat template closes an assistant turn with (<|im_end|> for ChatML, <|eot_id|> for
    Llama 3), or None. Found by rendering a conversation whose assistant message is a unique marker (a user turn
    after it, so the assistant turn is closed as any earlier turn is) and tokenizing the text right after the
    marker: its first token counts when it is a special or added token, which a model emits as one unit. None when
    the tokenizer has no template, the template fails on the conversation, the marker does not survive rendering,
    or what follows it is plain text (a template closing turns with a newline, say): callers then use the EOS."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": _MARKER},
        {"role": "user", "content": "2+2?"},
    ]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template's own checks (jinja's TemplateError, raise_exception) on a shape it refuses
        return None
    if not isinstance(rendered, str) or _MARKER not in rendered:
        return None
    after = rendered.split(_MARKER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    added = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
    return int(ids[0]) if ids[0] in added else None
