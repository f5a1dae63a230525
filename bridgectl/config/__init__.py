"""A run's config: composition from conf/ and overrides, the typed schema, its checks, key names (and TRL's),
and config.yaml as saved in a run directory."""
