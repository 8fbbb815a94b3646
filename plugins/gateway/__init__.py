"""The request pipeline every protocol shares: validation, queues, tools, middlewares.

Protocols turn what a client sent into a :class:`~.calls.Call` and hand it to the
gateway (``kernel.service("gateway")``); plugins wrap every call through the
``inferno_request_middleware`` hook and add HTTP routes through ``inferno_http_routes``.
"""
