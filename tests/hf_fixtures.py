"""Small local stand-ins for real models and datasets: a Llama-style model with a byte-level BPE tokenizer that has
a chat template, saved with save_pretrained, and GSM8K/MATH-shaped jsonl files. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

GSM8K_ROWS = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
    },
    {
        "question": "A box holds 12 pens. How many pens are in 2 boxes?",
        "answer": "2 boxes hold 2 * 12 = <<2*12=24>>24 pens.\n#### 24",
    },
    {
        "question": "Sara had 1,500 dollars and spent 500. How much is left?",
        "answer": "She has 1500 - 500 = <<1500-500=1000>>1000 dollars left.\n#### 1,000",
    },
    {"question": "Half of 18 children are girls. How many girls?", "answer": "18 / 2 = <<18/2=9>>9 girls.\n#### 9"},
]
MATH_ROWS = [
    {
        "problem": "Compute $\\frac{1}{2} + \\frac{1}{4}$.",
        "solution": "Adding, $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
    },
    {"problem": "What is $2^5$?", "solution": "$2^5 = \\boxed{32}$.", "answer": "32"},
    {"problem": "Solve $x + 3 = 5$.", "solution": "Subtract 3: $x = \\boxed{2}$."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_hf_model(directory: Path, with_chat_template: bool = True) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer trained on the fixtures' text, saved as a
    transformers model directory (safetensors)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [json.dumps(row) for row in GSM8K_ROWS + MATH_ROWS] * 4 + [
        "Please reason step by step, and put your final answer within \\boxed{}. The final answer is"
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
