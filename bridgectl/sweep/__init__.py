"""Optuna studies over run configs: the spec, the claims that make every grid point run once, and the workers."""
