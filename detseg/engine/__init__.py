"""The training engine: step-wise trainer and atomic checkpoints."""
