"""Other formats: HF-PEFT adapters in and out, merged HF checkpoints, and PEFT-style adapter arithmetic."""
