"""A run directory, read and written: checkpoints with their integrity checks, metadata, logs, and
the one loader of a pretrained decoder. Training, inference and evaluation all stand on it."""
