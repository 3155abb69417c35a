"""The plan: which output tensor comes from which inputs by which rule. Pure: headers and configs, no tensor data."""
