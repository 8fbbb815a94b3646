"""Rate limits shared through a real ``redis-server``: separate connections (as separate
Inferno processes have) that take from one bucket, leases that outlive a killed process
by at most their time, two real servers over HTTP, and a Redis that is down."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.kernel import Credentials
from inferno.plugins.gateway.calls import Call
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.ratelimit.limits import Limits
from inferno.plugins.ratelimit.redis_store import RedisStore
from inferno.plugins.ratelimit.stores import Refusal, StorageUnavailable
from tests.servers import ServerThread

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own on a free port, ready when yielded."""
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    seen = []
    for line in server.stdout:
        seen.append(line)
        if "Ready to accept connections" in line:
            break
    else:
        pytest.fail("redis-server did not start:\n" + "".join(seen))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait(10)
        server.stdout.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def admitted(store: RedisStore, owner: str, limits: Limits) -> str | None:
    try:
        return await store.admit(owner, limits)
    except Refusal:
        return None


# --------------------------------------------------------------------------- the store


async def test_two_processes_taking_at_once_admit_exactly_the_limit(redis_url: str) -> None:
    first, second = RedisStore(redis_url), RedisStore(redis_url)
    limits = Limits(requests=25)
    try:
        results = await asyncio.gather(*(
            admitted(first if number % 2 else second, "id:shared", limits)
            for number in range(80)))
        assert sum(result is not None for result in results) == 25
        with pytest.raises(Refusal) as refused:
            await first.admit("id:shared", limits)
        assert refused.value.kind == "requests"
        assert 0 < refused.value.reset <= 2.4  # 25 a minute: one every 2.4 s
        buckets, _ = first.keys("id:shared")
        assert 0 < await first.client.ttl(buckets) <= 61  # idle buckets go away
    finally:
        await first.close()
        await second.close()


async def test_running_calls_are_shared_and_their_slots_given_back(redis_url: str) -> None:
    first, second = RedisStore(redis_url), RedisStore(redis_url)
    limits = Limits(concurrent=3)
    try:
        results = await asyncio.gather(*(
            admitted(first if number % 2 else second, "id:k", limits) for number in range(10)))
        running = [lease for lease in results if lease is not None]
        assert len(running) == 3
        with pytest.raises(Refusal, match="concurrent"):
            await second.admit("id:k", limits)
        owner = first if running[0] in first._leases else second
        await owner.finish("id:k", limits, running[0], 0)
        assert await admitted(second, "id:k", limits) is not None
    finally:
        await first.close()
        await second.close()


async def test_a_killed_process_frees_its_slots_when_their_leases_end(redis_url: str) -> None:
    clock = Clock()
    killed = RedisStore(redis_url, lease_seconds=60, clock=clock)
    alive = RedisStore(redis_url, lease_seconds=60, clock=clock)
    limits = Limits(concurrent=2)
    try:
        await killed.admit("id:k", limits)
        long_call = await alive.admit("id:k", limits)
        await killed.client.aclose()  # gone without giving its slot back
        clock.now += 50
        assert await alive.refresh() == 1  # the long call's process is still there
        clock.now += 20  # the killed lease has ended; the refreshed one has not
        await alive.admit("id:k", limits)
        with pytest.raises(Refusal):
            await alive.admit("id:k", limits)
        await alive.finish("id:k", limits, long_call, 0)
        await alive.admit("id:k", limits)
    finally:
        await alive.close()
        await killed.close()


async def test_a_token_debt_is_shared_and_paid_off_over_time(redis_url: str) -> None:
    clock = Clock()
    first, second = RedisStore(redis_url, clock=clock), RedisStore(redis_url, clock=clock)
    limits = Limits(tokens=100)
    try:
        await first.admit("id:k", limits)
        await first.finish("id:k", limits, "", 250)
        with pytest.raises(Refusal) as refused:
            await second.admit("id:k", limits)
        assert refused.value.kind == "tokens"
        assert refused.value.reset == pytest.approx(151 * 60 / 100)
        clock.now += 91
        await second.admit("id:k", limits)
    finally:
        await first.close()
        await second.close()


async def test_a_redis_that_is_down_is_reported_without_its_password() -> None:
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        with pytest.raises(StorageUnavailable) as down:
            await store.admit("id:k", Limits(requests=1))
    finally:
        await store.close()
    assert "127.0.0.1" in str(down.value)
    assert "hunter2" not in str(down.value) + repr(store)


# --------------------------------------------------------------------------- servers


async def test_two_servers_sharing_redis_share_the_limits(redis_url: str,
                                                          tmp_path: Path) -> None:
    sets = ['rate_limits.storage="redis"', f'rate_limits.redis_url="{redis_url}"',
            "rate_limits.anonymous.requests_per_minute=3", "auth.none.allow_insecure=false"]
    with ServerThread("edge", tmp_path / "one", sets) as one, \
            ServerThread("edge", tmp_path / "two", sets) as two:
        async with aiohttp.ClientSession() as client:
            statuses = []
            for server in (one, two, one, two):
                async with client.get(server.url + "/v1/models") as response:
                    statuses.append(response.status)
                    headers, body = response.headers, await response.json()
            async with client.get(one.url + "/health/live") as health:
                assert health.status == 200  # public: never limited
    assert statuses == [200, 200, 200, 429]
    assert body["error"]["code"] == "rate_limited"
    assert "3 requests per minute" in body["error"]["message"]
    assert headers["X-RateLimit-Limit"] == "3"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["X-RateLimit-Reset"]) <= 20
    assert headers["Retry-After"] == headers["X-RateLimit-Reset"]


@pytest.mark.parametrize(("on_error", "outcome"), [("refuse", 503), ("allow", 200)])
async def test_when_redis_is_down_calls_are_refused_or_let_through(
        make_kernel: Any, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, on_error: str, outcome: int) -> None:
    kernel = make_kernel(None, base="edge", sets=[
        "plugins.models.watch_interval=0",
        'rate_limits.storage="redis"', f'rate_limits.on_storage_error="{on_error}"',
        f'rate_limits.redis_url="redis://:hunter2@127.0.0.1:{free_port()}/0"',
        "rate_limits.anonymous.requests_per_minute=3"])
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        made = Call("models.list", {}, credentials=Credentials(headers={}, peer="10.0.0.1"))
        if outcome == 200:
            await gateway.run(made)
        else:
            with pytest.raises(ApiError) as refused:
                await gateway.run(made)
            assert (refused.value.status, refused.value.code, refused.value.retry_after) \
                == (503, "rate_limit_unavailable", 5)
    logged = capfd.readouterr()
    shown = logged.out + logged.err + caplog.text  # wherever earlier tests sent logging
    assert "rate limit storage unavailable" in shown
    assert "hunter2" not in shown
