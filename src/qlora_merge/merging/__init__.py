"""The merge itself: a plan's tasks streamed from sources through the LoRA math into a sink."""
