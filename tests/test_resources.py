"""Resource budgets: reserve, release, exhaustion and eviction through the hook."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest

from inferno.kernel import EvictionRequest, ResourceExhausted, ResourceManager, hookimpl
from inferno.kernel.resources import parse_amount


def test_reserve_and_release_track_usage():
    manager = ResourceManager({"memory": 1000})
    with manager.reserved("memory", 600, owner="model:a"):
        assert manager.used("memory") == 600
        assert manager.usage()["memory"]["holders"] == {"model:a": 600}
    assert manager.available("memory") == 1000


def test_a_reservation_that_does_not_fit_says_who_holds_what():
    manager = ResourceManager({"memory": 1000})
    manager.reserve("memory", 700, owner="model:a")
    with pytest.raises(ResourceExhausted, match=r"model:b needs 400 memory but only 300 of 1000 "
                                                r"is free .*held by: model:a=700"):
        manager.reserve("memory", 400, owner="model:b")


def test_more_than_the_whole_budget_names_the_setting():
    with pytest.raises(ResourceExhausted, match=r"raise \[resources.budgets\] memory"):
        ResourceManager({"memory": 10}).reserve("memory", 11, owner="x")


def test_unknown_budget_lists_the_known_ones():
    with pytest.raises(KeyError, match="budgets: cpu_threads, memory"):
        ResourceManager({"memory": 1, "cpu_threads": 2}).reserve("gpu:0", 1, owner="x")


def test_release_is_idempotent():
    manager = ResourceManager({"memory": 10})
    held = manager.reserve("memory", 5, owner="x")
    held.release()
    held.release()
    assert manager.used("memory") == 0


def test_eviction_frees_room_for_a_new_reservation():
    requests: list[EvictionRequest] = []

    def evict(request: EvictionRequest) -> int:
        requests.append(request)
        victim = idle.pop(0)
        victim.release()
        return victim.amount

    manager = ResourceManager({"memory": 1000}, evict=evict)
    idle = [manager.reserve("memory", 400, owner="model:a"),
            manager.reserve("memory", 400, owner="model:b")]
    manager.reserve("memory", 500, owner="model:c")
    assert [r.amount for r in requests] == [300]  # one eviction was enough
    assert manager.usage()["memory"]["holders"] == {"model:b": 400, "model:c": 500}


async def test_kernel_evicts_through_the_hook(make_kernel):
    class IdleModels:
        held: ClassVar[list] = []

        @staticmethod
        @hookimpl
        def inferno_evict(request):
            if request.resource != "memory" or not IdleModels.held:
                return 0
            victim = IdleModels.held.pop()
            victim.release()
            return victim.amount

    kernel = make_kernel({"resources": {"memory": "1KiB"}}, plugins={"idle": IdleModels})
    resources = kernel.resources
    assert resources.capacity("memory") == 1024
    IdleModels.held.append(resources.reserve("memory", 1000, owner="model:old"))
    resources.reserve("memory", 900, owner="model:new")
    assert resources.usage()["memory"]["holders"] == {"model:new": 900}
    with pytest.raises(ResourceExhausted, match="nothing could be evicted"):
        resources.reserve("memory", 200, owner="model:third")


def test_budgets_come_from_the_profile(make_kernel):
    kernel = make_kernel({"resources": {"cpu_threads": 3, "budgets": {"gpu:0:memory": "80GiB"}}})
    assert kernel.resources.capacity("cpu_threads") == 3
    assert kernel.resources.capacity("gpu:0:memory") == 80 * 2**30
    assert kernel.resources.capacity("memory") > 0  # auto: the machine's memory


def test_budget_values_are_validated(make_kernel):
    from inferno.kernel import ConfigError
    message = 'resources.memory: must be "auto" or an amount'
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_kernel({"resources": {"memory": "lots"}})


@pytest.mark.parametrize(("text", "amount"), [("8GiB", 8 * 2**30), ("512 MB", 512 * 10**6),
                                              (2048, 2048), ("1.5k", 1500)])
def test_parse_amount(text, amount):
    assert parse_amount(text) == amount


def test_an_evictor_that_claims_to_free_but_does_not_cannot_hang_the_reservation():
    calls = []

    def liar(request: EvictionRequest) -> int:
        calls.append(request)
        return request.amount  # says it freed room, releases nothing

    manager = ResourceManager({"memory": 100}, evict=liar)
    manager.reserve("memory", 90, owner="model:a")
    with pytest.raises(ResourceExhausted, match="nothing could be evicted"):
        manager.reserve("memory", 20, owner="model:b")
    assert len(calls) == 1


def test_added_evictors_are_asked_after_the_hook_and_can_be_removed():
    asked: list[str] = []
    manager = ResourceManager({"memory": 1000}, evict=lambda r: asked.append("hook") or 0)
    held = manager.reserve("memory", 800, owner="model:a")

    def models(request: EvictionRequest) -> int:
        asked.append(f"models for {request.owner}")
        held.release()
        return held.amount

    remove = manager.add_evictor(models)
    manager.reserve("memory", 500, owner="cache")
    assert asked == ["hook", "models for cache"]
    remove()
    manager.reserve("memory", 500, owner="other")  # fits without eviction
    with pytest.raises(ResourceExhausted, match="nothing could be evicted"):
        manager.reserve("memory", 100, owner="late")
    assert asked == ["hook", "models for cache", "hook"]
