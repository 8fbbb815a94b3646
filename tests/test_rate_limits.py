"""Rate limits on one process: token buckets on a clock moved by hand, the middleware
around real replies, who is counted under which limits, and the plugin in a real kernel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferno.kernel import ConfigError, Credentials, Principal
from inferno.plugins.gateway.calls import Call, Delta, Final, StreamReply, ValueReply
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.permissions import AUTHENTICATED, PUBLIC
from inferno.plugins.ratelimit.limits import LimitPolicy, Limits
from inferno.plugins.ratelimit.middleware import RateLimitMiddleware
from inferno.plugins.ratelimit.plugin import DEFAULTS
from inferno.plugins.ratelimit.stores import MemoryStore, Refusal

ANONYMOUS = Principal("anonymous", frozenset({"operator"}), {"anonymous": True})


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(**changes: Any) -> dict[str, Any]:
    return {**DEFAULTS, **changes}


def limited(clock: Clock, **changes: Any) -> RateLimitMiddleware:
    return RateLimitMiddleware(LimitPolicy(config(**changes)), MemoryStore(clock=clock))


def call(peer: str = "10.0.0.1", principal: Principal | None = None,
         operation: str = "chat", permission: str = "infer") -> Call:
    made = Call(operation, {}, credentials=Credentials(headers={}, peer=peer),
                principal=principal)
    made.permission = permission
    return made


def stream(usage: dict[str, int]) -> StreamReply:
    async def events() -> AsyncIterator[Delta | Final]:
        yield Delta("hello", 1)
        yield Final("stop", usage)
    return StreamReply("m", events())


async def value(call: Call) -> ValueReply:
    return ValueReply({"usage": {"prompt_tokens": 4, "total_tokens": 4}})


async def refusal(middleware: RateLimitMiddleware, made: Call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await middleware(made, value)
    return caught.value


# --------------------------------------------------------------------------- buckets


async def test_a_bucket_admits_its_limit_then_refills_continuously() -> None:
    clock = Clock()
    store, limits = MemoryStore(clock=clock), Limits(requests=3)
    for _ in range(3):
        await store.admit("a", limits)
        await store.finish("a", limits, "", 0)
    with pytest.raises(Refusal) as refused:
        await store.admit("a", limits)
    assert (refused.value.kind, refused.value.limit, refused.value.remaining) \
        == ("requests", 3, 0)
    assert refused.value.reset == pytest.approx(20.0)  # 3 a minute: one every 20 s
    clock.now += 19.0
    with pytest.raises(Refusal) as still:
        await store.admit("a", limits)
    assert still.value.reset == pytest.approx(1.0)
    clock.now += 1.0
    await store.admit("a", limits)
    clock.now += 3600
    assert store.remaining("a") == (3.0, 0.0, 1)  # refilled to its capacity, not beyond


async def test_tokens_are_charged_after_the_call_and_a_debt_refuses_until_paid() -> None:
    clock = Clock()
    store, limits = MemoryStore(clock=clock), Limits(tokens=100)
    await store.admit("a", limits)  # the bucket is full: a call may start
    await store.finish("a", limits, "", 250)
    assert store.remaining("a") == (0.0, -150.0, 0)
    with pytest.raises(Refusal) as refused:
        await store.admit("a", limits)
    assert refused.value.kind == "tokens"
    assert refused.value.reset == pytest.approx(151 * 60 / 100)  # to one whole token
    clock.now += 90.0
    with pytest.raises(Refusal):
        await store.admit("a", limits)
    clock.now += 0.65
    await store.admit("a", limits)


async def test_a_refused_call_takes_nothing() -> None:
    clock = Clock()
    store, limits = MemoryStore(clock=clock), Limits(requests=5, tokens=10, concurrent=1)
    await store.admit("a", limits)
    for _ in range(3):
        with pytest.raises(Refusal, match="concurrent"):
            await store.admit("a", limits)
    await store.finish("a", limits, "", 20)
    with pytest.raises(Refusal, match="tokens"):
        await store.admit("a", limits)
    requests, _, running = store.remaining("a") or (0, 0, 0)
    assert (requests, running) == (4.0, 0)


async def test_memory_stays_bounded_under_a_flood_of_addresses() -> None:
    clock = Clock()
    store, limits = MemoryStore(max_callers=100, clock=clock), Limits(requests=10, concurrent=2)
    await store.admit("busy", limits)  # a call still running: never forgotten
    for number in range(5000):
        await store.admit(f"flood-{number}", limits)
        await store.finish(f"flood-{number}", limits, "", 0)
        clock.now += 0.01
    assert len(store) <= 100
    assert store.remaining("busy") is not None
    assert store.remaining("flood-4999") is not None  # the most recent are kept
    clock.now += 60.0  # every bucket full again: all of them go at the next sweep
    for number in range(11):
        await store.admit(f"later-{number}", limits)
    assert len(store) <= 13


# --------------------------------------------------------------------------- the middleware


async def test_a_refusal_is_a_429_that_says_which_limit_and_when() -> None:
    middleware = limited(Clock(), anonymous={**DEFAULTS["anonymous"], "requests_per_minute": 2})
    await middleware(call(), value)
    await middleware(call(), value)
    error = await refusal(middleware, call())
    assert (error.status, error.code, error.retry_after) == (429, "rate_limited", 30)
    assert error.headers == {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": "30"}
    assert "2 requests per minute for anonymous callers from 10.0.0.1" in error.message
    assert "try again in 30 s" in error.message
    assert error.envelope()["error"]["type"] == "rate_limit_error"


async def test_a_slot_is_held_until_the_stream_ends_or_is_closed() -> None:
    middleware = limited(Clock(), anonymous={**DEFAULTS["anonymous"], "concurrent": 1})
    usage = {"prompt_tokens": 2, "completion_tokens": 3}

    async def generate(call: Call) -> StreamReply:
        return stream(usage)

    first = await middleware(call(), generate)
    error = await refusal(middleware, call())
    assert (error.status, error.headers["X-RateLimit-Limit"]) == (429, "1")
    assert "1 call at once for anonymous callers" in error.message
    assert "try again when one of them finishes" in error.message
    await first.collect()  # iterated to the end: the slot is free
    second = await middleware(call(), generate)
    await refusal(middleware, call())
    await second.aclose()  # closed before it started: free as well
    await middleware(call(), value)


async def test_a_slot_is_given_back_when_the_call_fails() -> None:
    middleware = limited(Clock(), anonymous={**DEFAULTS["anonymous"], "concurrent": 1})

    async def failing(call: Call) -> Any:
        raise ApiError(404, "no such model", code="model_not_found")

    for _ in range(3):
        with pytest.raises(ApiError, match="no such model"):
            await middleware(call(), failing)
    await middleware(call(), value)


async def test_a_streams_tokens_are_charged_when_it_ends() -> None:
    clock = Clock()
    middleware = limited(clock, anonymous={**DEFAULTS["anonymous"], "tokens_per_minute": 10})

    async def generate(call: Call) -> StreamReply:
        return stream({"prompt_tokens": 6, "completion_tokens": 9})

    reply = await middleware(call(), generate)
    await middleware(call(), value)  # nothing charged yet: the first is still running
    await reply.collect()
    error = await refusal(middleware, call())  # 10 - 4 - 15: nine tokens in debt
    assert "10 tokens per minute" in error.message
    assert error.retry_after == 60  # (1 + 9) tokens at 10 a minute
    clock.now += 60
    await middleware(call(), value)


async def test_a_stream_dropped_before_its_end_is_charged_what_it_streamed() -> None:
    clock = Clock()
    middleware = limited(clock, anonymous={**DEFAULTS["anonymous"], "tokens_per_minute": 10})

    async def long_answer() -> AsyncIterator[Delta | Final]:
        for _ in range(100):
            yield Delta("word", 3)
        yield Final("stop", {"prompt_tokens": 1, "completion_tokens": 300})

    async def generate(call: Call) -> StreamReply:
        return StreamReply("m", long_answer())

    reply = await middleware(call(), generate)
    taken = 0
    async for _ in reply:
        taken += 1
        if taken == 4:  # 12 tokens streamed, then the client hangs up
            break
    await reply.aclose()
    error = await refusal(middleware, call())
    assert error.status == 429
    assert error.retry_after == 18  # (1 + 2) tokens in debt at 10 a minute


async def test_anonymous_callers_are_counted_per_address() -> None:
    middleware = limited(Clock(), anonymous={**DEFAULTS["anonymous"], "requests_per_minute": 1})
    await middleware(call("10.0.0.1"), value)
    await middleware(call("10.0.0.2"), value)
    await middleware(call("10.0.0.3", principal=ANONYMOUS), value)
    await refusal(middleware, call("10.0.0.1", principal=ANONYMOUS))
    behind_proxy = call("10.0.0.9")
    behind_proxy.state["client_ip"] = "10.0.0.2"  # the address authentication resolved
    await refusal(middleware, behind_proxy)
    await middleware(call("2001:db8:1:2::5"), value)
    await refusal(middleware, call("2001:db8:1:2:ffff::1"))  # the same /64: one host
    await middleware(call("2001:db8:1:3::5"), value)
    await refusal(middleware, call("::ffff:10.0.0.3"))  # IPv4 written as IPv6


async def test_authenticated_callers_are_counted_per_principal() -> None:
    middleware = limited(Clock(), requests_per_minute=1)
    alice = Principal("key_alice", frozenset({"user"}))
    await middleware(call("10.0.0.1", alice), value)
    error = await refusal(middleware, call("10.0.0.2", alice))  # another address: same key
    assert "for key_alice" in error.message
    await middleware(call("10.0.0.1", Principal("key_bob", frozenset({"user"}))), value)
    await middleware(call("10.0.0.1"), value)  # anonymous limits are unlimited here


async def test_identity_checks_public_calls_and_unlimited_callers_are_not_counted() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    middleware = RateLimitMiddleware(
        LimitPolicy(config(anonymous={**DEFAULTS["anonymous"], "requests_per_minute": 1})),
        store)
    for _ in range(5):
        await middleware(call(operation="access", permission=PUBLIC), value)
        await middleware(call(operation="access", permission=AUTHENTICATED), value)
        await middleware(call(principal=Principal("admin", frozenset({"admin"}))), value)
    assert len(store) == 0
    await middleware(call(operation="access", permission="keys:manage"), value)
    await refusal(middleware, call())


# --------------------------------------------------------------------------- which limits


def test_roles_give_their_most_generous_limits_and_a_keys_own_limits_win() -> None:
    policy = LimitPolicy(config(
        requests_per_minute=10, tokens_per_minute=1000, concurrent=2,
        roles={"basic": {"requests_per_minute": 5, "tokens_per_minute": 100},
               "pro": {"requests_per_minute": 50, "concurrent": 0}}))
    def limits(roles: set[str], **attributes: Any) -> Limits:
        return policy.caller(Principal("k", frozenset(roles), attributes), "10.0.0.1")[1]

    assert limits(set()) == Limits(10, 1000, 2)
    assert limits({"unlisted"}) == Limits(10, 1000, 2)
    assert limits({"basic"}) == Limits(5, 100, 2)
    assert limits({"basic", "pro"}) == Limits(50, 1000, 0)  # 0: unlimited, most generous
    assert limits({"basic", "pro"}, limits={"requests_per_minute": 1}) == Limits(1, 1000, 0)
    assert limits({"basic"}, limits={"concurrent": 7, "tokens_per_minute": -3}) \
        == Limits(5, 100, 7)  # a value that is not a limit is ignored
    owner, anonymous = policy.caller(None, "10.0.0.1")
    assert (owner, anonymous) == ("ip:10.0.0.1", Limits())


# --------------------------------------------------------------------------- in a kernel


async def test_the_plugin_limits_calls_through_the_gateway(make_kernel: Any) -> None:
    kernel = make_kernel(None, base="edge", sets=[
        "plugins.models.watch_interval=0", "rate_limits.anonymous.requests_per_minute=2"])
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        for _ in range(2):
            await gateway.run(call("10.1.1.1", operation="models.list"))
        with pytest.raises(ApiError) as refused:
            await gateway.run(call("10.1.1.1", operation="models.list"))
        await gateway.run(call("10.1.1.2", operation="models.list"))
    assert refused.value.status == 429
    assert refused.value.headers["X-RateLimit-Remaining"] == "0"
    assert "anonymous callers from 10.1.1.1" in refused.value.message


async def test_limits_can_be_turned_off(make_kernel: Any) -> None:
    kernel = make_kernel(None, base="edge", sets=[
        "plugins.models.watch_interval=0", "rate_limits.anonymous.requests_per_minute=1",
        "rate_limits.enabled=false"])
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        for _ in range(3):
            await gateway.run(call("10.1.1.1", operation="models.list"))


def test_every_config_mistake_is_reported_and_the_redis_url_is_never_shown(
        make_kernel: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        make_kernel({"rate_limits": {
            "storage": "disk", "on_storage_error": "ignore", "concurrent": -1,
            "anonymous": {"requests_per_minute": "many"},
            "roles": {"pro": {"requests_per_minute": 5, "per_hour": 3}},
            "redis_url": "http://user:hunter2@cache:6379/0"}})
    keys = {problem.key for problem in caught.value.problems}
    assert {"rate_limits.storage", "rate_limits.on_storage_error", "rate_limits.concurrent",
            "rate_limits.anonymous.requests_per_minute", "rate_limits.roles",
            "rate_limits.redis_url"} <= keys
    assert "hunter2" not in str(caught.value)
    kernel = make_kernel({"rate_limits": {"redis_url": "redis://:hunter2@cache:6379/0"}})
    assert kernel.config["rate_limits"]["redis_url"] == "********"


def test_auto_storage_is_redis_once_a_url_is_set(make_kernel: Any) -> None:
    from inferno.plugins.ratelimit.plugin import storage

    url = "redis://127.0.0.1:6379/0"
    assert storage(make_kernel(None).plugin_config("rate_limits")) == "memory"
    assert storage(make_kernel({"rate_limits": {"redis_url": url}})
                   .plugin_config("rate_limits")) == "redis"
    assert storage(make_kernel({"rate_limits": {"redis_url": url, "storage": "memory"}})
                   .plugin_config("rate_limits")) == "memory"
    with pytest.raises(ConfigError, match=r'rate_limits\.redis_url: storage = "redis" needs'):
        make_kernel({"rate_limits": {"storage": "redis"}})
