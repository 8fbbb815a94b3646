"""The model manager: finds, describes, verifies, loads, evicts and hot-swaps models."""
