"""A PEFT LoRA adapter on disk: its config and its weights."""
