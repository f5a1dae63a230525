"""The run directory as a format: its writer, the heartbeat that tells a live run from a dead one, where runs may
be written, redaction of secrets, and the W&B and TensorBoard sinks."""
