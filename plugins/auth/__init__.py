"""Auth providers (entry-point group ``inferno.auth``): ``none``, ``api_key`` and ``jwt``."""
