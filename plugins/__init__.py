"""Inferno's built-in plugins. Each is an entry point in Inferno's ``pyproject.toml``,
in the same groups third-party plugins use."""
