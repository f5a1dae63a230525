"""End tokens (core/end_tokens): a model that declares several end tokens, or closes a chat-template turn with a
token other than its EOS, stops where it means to. With tokenizers shaped like Qwen2.5 base (EOS <|endoftext|>,
ChatML turns closed by <|im_end|>), Qwen2.5-Instruct (generation config [<|im_end|>, <|endoftext|>]) and
Llama-3-Instruct (three end ids in its generation config, turns closed by <|eot_id|>): the set found is exactly
theirs; both samplers and evaluation decoding stop at each id of it; completion masks, truncation flags and the GRPO
loss mask cut at the first end token of any kind; SFT targets end with the turn end; the export's generation config
lists the set. The built-in tiny model's set stays its EOS alone."""

from __future__ import annotations

import json
import math
import string
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bridgectl.core.end_tokens import EndTokens, end_tokens_of, turn_end_id
from bridgectl.core.losses import make_sft_batch
from bridgectl.core.model import Policy
from bridgectl.core.rollout import KV_CACHE, Rollouts, completion_mask_from, generate, truncated_rows

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHARACTERS = list(dict.fromkeys(string.ascii_letters + string.digits + string.punctuation + " \n"))


def char_tokenizer(specials: list[str], eos: str, template: str | None, bos: str | None = None):
    """A character-level tokenizer with `specials` as special tokens (ids 0..), EOS `eos` (also the pad token, as
    core/model.tokenizer_from makes it for tokenizers without one) and chat template `template`."""
    vocab = {token: index for index, token in enumerate(specials + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    others = [token for token in specials if token not in (eos, bos)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=eos,
        bos_token=bos,
        additional_special_tokens=others,
        padding_side="left",
    )
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def qwen_base_tokenizer():
    return char_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", CHATML)


def qwen_instruct_tokenizer():
    return char_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", CHATML)


def llama3_tokenizer():
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
    ]
    return char_tokenizer(specials, "<|end_of_text|>", LLAMA3, bos="<|begin_of_text|>")


def ids_of(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


# shape -> (tokenizer, generation config eos tokens, the end set, the SFT target): the real models' configs, with
# the tokens standing for their ids (Qwen2.5-3B: 151643; -Instruct: [151645, 151643]; Llama-3.1-8B-Instruct:
# [128001, 128008, 128009])
SHAPES = {
    "qwen_base": (qwen_base_tokenizer, ["<|endoftext|>"], ["<|endoftext|>", "<|im_end|>"], "<|im_end|>"),
    "qwen_instruct": (
        qwen_instruct_tokenizer,
        ["<|im_end|>", "<|endoftext|>"],
        ["<|im_end|>", "<|endoftext|>"],
        "<|im_end|>",
    ),
    "llama3": (
        llama3_tokenizer,
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
}


def shape(name: str):
    """(tokenizer, generation config, the end tokens the model should have)."""
    make, declared, ends, target = SHAPES[name]
    tokenizer = make()
    declared_ids = ids_of(tokenizer, *declared)
    config = GenerationConfig(eos_token_id=declared_ids[0] if len(declared_ids) == 1 else declared_ids)
    return tokenizer, config, EndTokens(ids=tuple(ids_of(tokenizer, *ends)), target=ids_of(tokenizer, target)[0])


def tiny_lm(tokenizer, generation_config=None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    if generation_config is not None:
        model.generation_config.eos_token_id = generation_config.eos_token_id
    return model.eval()


# ---- the set ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SHAPES))
def test_the_end_set_is_the_tokenizer_eos_the_generation_config_and_the_template_turn_end(name):
    tokenizer, config, expected = shape(name)
    found = end_tokens_of(tokenizer, config, chat_template=True)
    assert set(found.ids) == set(expected.ids) and len(found.ids) == len(set(found.ids))
    assert found.target == expected.target
    # without the template, the turn end is only there when the model's own config declares it
    plain = end_tokens_of(tokenizer, config, chat_template=False)
    declared = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert set(plain.ids) == {tokenizer.eos_token_id, *declared}
    assert plain.target == tokenizer.eos_token_id


def test_a_qwen_base_model_adds_the_turn_end_its_config_does_not_declare():
    tokenizer, config, _ = shape("qwen_base")
    endoftext, im_end = ids_of(tokenizer, "<|endoftext|>", "<|im_end|>")
    assert turn_end_id(tokenizer) == im_end
    assert end_tokens_of(tokenizer, config, chat_template=True) == EndTokens(ids=(endoftext, im_end), target=im_end)
    assert end_tokens_of(tokenizer, config, chat_template=False) == EndTokens(ids=(endoftext,), target=endoftext)


@pytest.mark.parametrize(
    "template",
    [
        None,  # no template
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}",  # turns closed by a newline
        "{{ raise_exception('system prompts only') }}",  # a template that refuses the conversation
        "{% for m in messages %}{{ m['role'] }}{% endfor %}",  # drops the content
    ],
)
def test_a_template_without_a_turn_end_token_falls_back_to_the_eos(template):
    tokenizer = char_tokenizer(["<pad>", "</s>", "<|im_end|>"], "</s>", template)
    assert turn_end_id(tokenizer) is None
    eos = tokenizer.eos_token_id
    assert end_tokens_of(tokenizer, GenerationConfig(eos_token_id=eos), chat_template=True) == EndTokens((eos,), eos)


def test_the_built_in_tiny_model_ends_at_its_eos_alone(tokenizer):
    from bridgectl.models.tiny import SHIPPED_DIR

    config = GenerationConfig.from_pretrained(SHIPPED_DIR)
    assert end_tokens_of(tokenizer, config, chat_template=True) == EndTokens(ids=(2,), target=2)
    assert Policy(model=torch.nn.Linear(1, 1), tokenizer=tokenizer).end_tokens == EndTokens(ids=(2,), target=2)


def test_build_context_finds_the_set_once_and_sft_batches_end_with_the_turn_end(tmp_path):
    """A Qwen2.5-base-shaped model on a GSM8K file, as a run loads it: the policy's end tokens include <|im_end|>,
    and SFT and demonstration targets end with it, not with <|endoftext|>; with task.chat_template=false the EOS."""
    from hf_fixtures import GSM8K_ROWS, write_jsonl

    from bridgectl.config.compose import compose
    from bridgectl.core.context import demonstration_batch, next_sft_batch
    from bridgectl.training.setup import build_context

    tokenizer, config, expected = shape("qwen_base")
    model_dir = tmp_path / "model"
    tiny_lm(tokenizer, config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    base = [
        "model=hf",
        f"model.name_or_path={model_dir}",
        "task=gsm8k",
        f"task.path={data}",
        f"task.eval_sets={{test:{data}}}",
        "train.threads=1",
        "sft.batch_size=2",
        "recipe=sft",
    ]
    endoftext, im_end = ids_of(tokenizer, "<|endoftext|>", "<|im_end|>")
    for extra, ends, target in (([], expected, im_end), (["task.chat_template=false"], None, endoftext)):
        ctx = build_context(compose(base + extra), show_progress=False)
        assert ctx.policy.end_tokens == (ends or EndTokens(ids=(endoftext,), target=endoftext))
        for batch in (next_sft_batch(ctx), demonstration_batch(ctx, [next(ctx.sft_examples)])):
            last_labels = [row[row != -100][-1].item() for row in batch.labels]
            assert last_labels == [target] * len(last_labels)


@pytest.mark.parametrize("name", ["qwen_base", "llama3"])
def test_sft_targets_end_with_the_given_end_token(name):
    tokenizer, _, expected = shape(name)
    batch = make_sft_batch(tokenizer, ["ab", "abcd"], ["x", "xyz"], "cpu", end_id=expected.target)
    for labels, input_ids, mask in zip(batch.labels, batch.input_ids, batch.attention_mask):
        assert labels[labels != -100].tolist()[-1] == expected.target != tokenizer.eos_token_id
        assert input_ids[mask.bool()].tolist()[-1] == expected.target  # the model reads it too (teacher forcing)
    assert make_sft_batch(tokenizer, ["ab"], ["x"], "cpu").labels[0, -1] == tokenizer.eos_token_id  # the default


# ---- masks and truncation -----------------------------------------------------------------------------------------
def crafted_rows(name: str) -> tuple[torch.Tensor, list[list[int]], list[bool], EndTokens, object]:
    """Completion ids right-padded with the pad token (which is the EOS for these tokenizers): a row per end token
    (at column 1, then pad), a row with no end token, and a row whose first end token is followed by another kind;
    with the mask and truncation flag each row should get."""
    tokenizer, _, ends = shape(name)
    a, b = ids_of(tokenizer, "a", "b")
    pad = tokenizer.pad_token_id
    rows, masks, truncated = [], [], []
    for end in ends.ids:
        rows.append([a, end, pad, pad])
        masks.append([1, 1, 0, 0])
        truncated.append(False)
    rows.append([a, b, a, b])  # cut off by the length limit
    masks.append([1, 1, 1, 1])
    truncated.append(True)
    rows.append([ends.ids[-1], a, ends.ids[0], b])  # the first end token of any kind ends it
    masks.append([1, 0, 0, 0])
    truncated.append(False)
    return torch.tensor(rows), masks, truncated, ends, tokenizer


@pytest.mark.parametrize("name", ["qwen_base", "llama3"])
def test_completion_masks_and_truncation_cut_at_the_first_end_token_of_any_kind(name):
    ids, masks, truncated, ends, _ = crafted_rows(name)
    mask = completion_mask_from(ids, ends.ids)
    assert mask.tolist() == masks
    rollouts = Rollouts(ids, torch.ones(ids.size(0), 1), ids, mask, torch.zeros(ids.shape), [""] * ids.size(0))
    assert truncated_rows(rollouts, ends.ids).tolist() == truncated
    # the GRPO loss mask with rl.mask_truncated_completions drops exactly the row without an end token
    from bridgectl.core.grpo import loss_mask

    ctx = SimpleNamespace(
        cfg=SimpleNamespace(rl=SimpleNamespace(mask_truncated_completions=True)),
        policy=SimpleNamespace(end_tokens=ends),
    )
    kept = loss_mask(rollouts, ctx)
    assert kept.tolist() == [[0] * 4 if cut else row for row, cut in zip(masks, truncated)]


# ---- sampling -----------------------------------------------------------------------------------------------------
@contextmanager
def forced_ends(model, end_ids: tuple[int, ...], plan: dict[int, tuple[int | None, int]]):
    """A forward hook that, for the row whose prompt is `length` tokens long (plan: length -> (end id, step)),
    forbids every end id before `step` and forces the given one there (None: never ends). Rows are told apart by
    their prompt length read off the attention mask, so rows leaving the decoding batch do not confuse it. Yields
    the list of forward passes made (the batch size of each)."""
    state, passes = {}, []

    def hook(module, args, kwargs, output):
        mask = kwargs["attention_mask"]
        if kwargs.get(KV_CACHE) is None:
            state["prompt_width"] = mask.size(1)
        step = mask.size(1) - state["prompt_width"]
        passes.append(mask.size(0))
        logits = output.logits[:, -1]
        for row, length in enumerate((mask.sum(dim=1) - step).tolist()):
            end, at = plan[length]
            logits[row, list(end_ids)] = -math.inf
            if end is not None and step == at:
                logits[row, end] = 30.0
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


def ending_plan(ends: EndTokens) -> tuple[list[str], dict[int, tuple[int | None, int]]]:
    """Prompts of 1, 2, ... characters: one per end id (ending after 2, 3, ... tokens) and one that never ends."""
    options = [(end, index + 1) for index, end in enumerate(ends.ids)] + [(None, 0)]
    prompts = ["a" * (n + 1) for n in range(len(options))]
    return prompts, {len(prompt): option for prompt, option in zip(prompts, options)}


def assert_ended_as_planned(rollouts: Rollouts, plan: dict, prompts: list[str], pad: int, limit: int):
    for row, prompt in enumerate(prompts):
        end, at = plan[len(prompt)]
        ids, mask = rollouts.completion_ids[row].tolist(), rollouts.completion_mask[row].tolist()
        length = at + 1 if end is not None else limit
        assert sum(mask) == length and mask[:length] == [1] * length
        if end is not None:
            assert ids[at] == end and ids[length:] == [pad] * (len(ids) - length)


@pytest.mark.parametrize("name", ["qwen_base", "llama3"])
@pytest.mark.parametrize("greedy", [True, False])
def test_the_sampler_stops_a_row_at_each_end_id(name, greedy):
    tokenizer, config, ends = shape(name)
    model = tiny_lm(tokenizer, config)
    prompts, plan = ending_plan(ends)
    limit = 8

    def randomness(rows: list[str]) -> dict:
        return {"greedy": True} if greedy else {"group_generators": [torch.Generator().manual_seed(1) for _ in rows]}

    with forced_ends(model, ends.ids, plan):
        rollouts = generate(model, tokenizer, prompts, limit, end_ids=ends.ids, **randomness(prompts))
        assert_ended_as_planned(rollouts, plan, prompts, tokenizer.pad_token_id, limit)
        assert truncated_rows(rollouts, ends.ids).tolist() == [end is None for end, _ in plan.values()]
        # stopping at the EOS alone runs every row that ends otherwise to the limit: what this fixes
        eos_only = generate(model, tokenizer, prompts, limit, end_ids=(tokenizer.eos_token_id,), **randomness(prompts))
    # rows that all end: decoding stops at the step the last one ends, each row leaving as it ends
    ending = [prompt for prompt in prompts if plan[len(prompt)][0] is not None]
    last = max(at for end, at in plan.values() if end is not None)
    with forced_ends(model, ends.ids, plan) as passes:
        done = generate(model, tokenizer, ending, limit, end_ids=ends.ids, **randomness(ending))
    assert_ended_as_planned(done, plan, ending, tokenizer.pad_token_id, limit)
    assert done.completion_ids.size(1) == len(passes) == last + 1
    assert passes[-1] == 1  # only the last row to end is still decoding
    for row, prompt in enumerate(prompts):
        end = plan[len(prompt)][0]
        if end is not None and end != tokenizer.eos_token_id:
            assert int(eos_only.completion_mask[row].sum()) == limit


def test_evaluation_decodes_with_the_policy_end_tokens():
    """A run's evaluations (core/evaluate.decoding) and `bridgectl eval` (evaluation.decoder_for) stop at the set."""
    from bridgectl.core.evaluate import decoding
    from bridgectl.training.eval_run import decoder_for

    tokenizer, config, ends = shape("qwen_base")
    model = tiny_lm(tokenizer, config)
    prompts, plan = ending_plan(ends)
    cfg = OmegaConf.create(
        {"rollout": {"backend": "hf", "cpu_packed_weights": True}, "task": {"name": "gsm8k", "chat_template": True}}
    )
    ctx = SimpleNamespace(
        rollout_engine=None, policy=Policy(model=model, tokenizer=tokenizer, end_tokens=ends), cfg=cfg
    )
    with forced_ends(model, ends.ids, plan):
        with decoding(ctx) as decode:
            assert_ended_as_planned(decode(prompts, 8, None, None), plan, prompts, tokenizer.pad_token_id, 8)
        decode = decoder_for(cfg, model, tokenizer)
        assert_ended_as_planned(decode(prompts, 8, None, None), plan, prompts, tokenizer.pad_token_id, 8)
        assert_ended_as_planned(
            decode(prompts, 8, 1.0, torch.Generator().manual_seed(0)), plan, prompts, tokenizer.pad_token_id, 8
        )


def test_the_vllm_sampler_stops_at_the_whole_set(monkeypatch):
    """vLLM's SamplingParams get every end id as stop_token_ids (vLLM stands in here: it is not installed)."""
    from bridgectl.core import vllm_rollout

    tokenizer, config, ends = shape("llama3")
    kwargs = vllm_rollout.sampling_kwargs(16, 0.7, 5, (0, 1.0, 0.0), ends.ids)
    assert kwargs["stop_token_ids"] == list(ends.ids) and kwargs["max_tokens"] == 16 and kwargs["seed"] == 5

    made = []

    class SamplingParams:
        def __init__(self, **given):
            made.append(given)

    def fake_generate(requests, params, use_tqdm):
        eot = ids_of(tokenizer, "<|eot_id|>")[0]
        token_ids = [[ids_of(tokenizer, "a")[0], eot] for _ in requests]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=None)]) for ids in token_ids]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=SamplingParams))
    engine = vllm_rollout.VLLMRollouts.__new__(vllm_rollout.VLLMRollouts)
    engine.llm = SimpleNamespace(generate=fake_generate)
    policy = Policy(model=tiny_lm(tokenizer, config), tokenizer=tokenizer, end_tokens=ends)
    rollouts, _ = engine._generate(policy, ["ab", "abc"], 16, 1.0, [1, 2])
    assert [p["stop_token_ids"] for p in made] == [list(ends.ids)] * 2
    assert rollouts.completion_mask.tolist() == [[1, 1], [1, 1]]
    assert truncated_rows(rollouts, ends.ids).tolist() == [False, False]


# ---- export -------------------------------------------------------------------------------------------------------
def test_the_export_generation_config_lists_the_whole_set(tmp_path):
    """`bridgectl export` of a Qwen2.5-base-shaped model used with its chat template: the generation config's
    eos_token_id is [<|endoftext|>, <|im_end|>], so transformers' generate() stops where bridgectl did."""
    from bridgectl.training.export import generation_eos, write_merged

    assert generation_eos((2,)) == 2 and generation_eos((5, 7)) == [5, 7] and generation_eos(()) is None
    tokenizer, config, ends = shape("qwen_base")
    source = tmp_path / "final"
    tiny_lm(tokenizer, config).save_pretrained(source, safe_serialization=True)
    tokenizer.save_pretrained(source)
    cfg = OmegaConf.create(
        {
            "model": {"dtype": "float32", "attn_implementation": "sdpa", "trust_remote_code": False},
            "task": {"name": "gsm8k", "chat_template": True},
            "eval": {"max_new_tokens": 12},
        }
    )
    staging = tmp_path / "out"
    write_merged(cfg, source, None, torch.device("cpu"), staging)
    written = json.loads((Path(staging) / "generation_config.json").read_text())
    assert written["eos_token_id"] == list(ends.ids) == ids_of(tokenizer, "<|endoftext|>", "<|im_end|>")
