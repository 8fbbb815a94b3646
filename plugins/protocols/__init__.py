"""Protocols: HTTP (OpenAI-compatible, Ollama-compatible and Inferno's own API),
WebSocket and the stdin/stdout JSON-lines pipeline. Each turns what a client sent into
a gateway call (``inferno.plugins.gateway``) and the reply into its own framing."""
