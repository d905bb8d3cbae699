"""Training a run: building it from a config (builder), its step and evaluation (compute), the loop (train), its workdir, checkpoints and early stopping; K runs at once (multi) and sweeps."""
