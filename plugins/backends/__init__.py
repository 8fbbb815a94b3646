"""Backends: the drivers that load model files and run them (``inferno.backends``)."""
