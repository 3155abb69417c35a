"""Outputs: the output's lock and staging directory, sinks that write the merged tensors, the model card, upload."""
