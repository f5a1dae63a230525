"""Training a run: the runner and its loop, the context it builds, compute budgets, resuming, and evaluating or
exporting what a run trained."""
