"""Safetensors checkpoints on disk: the file format, the sharded index, reading and writing tensors."""
