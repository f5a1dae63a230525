"""config.yaml as bridgectl writes it: the resolved config's YAML between a first line recording how many keys it
holds and a last line marking its end, so a file cut short or that lost keys is told from an older one
(bridgectl/run_config.py reads it back and checks it). Torch-free."""

from __future__ import annotations

from omegaconf import OmegaConf

CONFIG_END = "# end of config.yaml"
"""The last line of every config.yaml bridgectl writes: a file without it was cut short."""


def count_keys(data: dict) -> int:
    """The keys of nested mapping `data` as its YAML lists them: each key whose value is not a non-empty mapping
    (a section's keys count, the section does not; an empty mapping such as `eval_sets: {}` counts as one)."""
    return sum(count_keys(value) if isinstance(value, dict) and value else 1 for value in data.values())


def config_text(data: dict) -> str:
    """The text of config.yaml for the plain (resolved, redacted) config `data`: its YAML between a first line
    recording how many keys it holds and CONFIG_END, which check_whole reads back."""
    body = OmegaConf.to_yaml(OmegaConf.create(data))
    return (f"# bridgectl run config: {count_keys(data)} keys; its last line is '{CONFIG_END}' "
            f"(bridgectl/run_config.py)\n{body}{CONFIG_END}\n")
