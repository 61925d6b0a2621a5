"""Pretraining: optimizer, losses, the pure train step, the loop, checkpoints, run directories,
multi-host."""
