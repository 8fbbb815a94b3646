"""Inferno's shipped profiles: TOML files found by name (``inferno --profile edge``)."""
