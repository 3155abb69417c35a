"""Inputs: where the base and the adapters are (local, hub cache, hub headers), and the base's tensors as sources."""
