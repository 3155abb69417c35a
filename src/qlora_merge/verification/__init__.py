"""Proof that a merged checkpoint is its base and adapters merged: tensors byte for byte, logits against PEFT."""
