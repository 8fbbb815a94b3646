"""The kernel: lifecycle, the request gate, and the handle drivers use.

States: created → configured → starting → running → stopping → stopped.
Drivers start in kind order (backends ... protocols last) on an
``AsyncExitStack``; shutdown unwinds it, so only what started is stopped, in
reverse. While running the configuration is frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import platformdirs
import pluggy

from . import loader
from .assembly import Assembly, assemble
from .config import Layers, freeze, masked, profile_chain, read_toml, thaw
from .contracts import KINDS, Driver, DriverContext
from .errors import ConfigError, ConfigProblem, Draining, LifecycleError, PluginError
from .events import EventBus, KernelStateChanged, PluginStarted, PluginStopped
from .logs import get_logger
from .resources import EvictionRequest, ResourceManager, detect_budgets, parse_amount


class State(StrEnum):
    CREATED = "created"
    CONFIGURED = "configured"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Kernel:
    """One Inferno runtime: its own plugin manager, bus, resources and drivers."""

    def __init__(self, layers: Layers, *, plugins: Mapping[str, Any] | None = None) -> None:
        self.layers = layers
        self._extra_plugins = dict(plugins or {})
        self._state = State.CREATED
        self.log = get_logger("kernel")
        self._assembly: Assembly | None = None
        self._config: Mapping[str, Any] = freeze({})
        self._shown: Mapping[str, Any] = freeze({})
        self._drivers: dict[str, dict[str, Driver]] = {}
        self._stack: AsyncExitStack | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._accepting = False
        self.bus = EventBus(log=get_logger("bus"))
        self._resources: ResourceManager | None = None
        self._services: dict[str, object] = {}
        self._stop_reasons: list[str] = []
        self._stop_requested = asyncio.Event()

    @classmethod
    def from_profile(cls, profile: str = "edge", *, config_file: str | Path | None = None,
                     sets: Sequence[str] = (), overrides: Mapping[str, Any] | None = None,
                     plugins: Mapping[str, Any] | None = None) -> Kernel:
        """A kernel for a shipped profile name or a profile file, plus the user's layers."""
        files = profile_chain(profile)
        if config_file:
            user = Path(config_file).expanduser().resolve()
            if not user.is_file():
                what = "is a directory" if user.is_dir() else "does not exist"
                raise ConfigError([ConfigProblem("--config", f"{user} {what}; expected a "
                                                             f"TOML file")])
            if "extends" in read_toml(user):
                raise ConfigError([ConfigProblem(
                    "extends", "only a profile may extend another; use --profile for this file "
                               "or remove `extends`", str(user))])
            files.append(user)
        return cls(Layers(files=files, sets=tuple(sets), overrides=overrides), plugins=plugins)

    # ----------------------------------------------------------------------- handle

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def config(self) -> Mapping[str, Any]:
        """The whole configuration, read-only, with every secret masked: a plugin sees the
        secrets of its own section (``context.config``) and nobody else's."""
        return self._shown

    @property
    def assembly(self) -> Assembly:
        if self._assembly is None:
            raise LifecycleError("the kernel is not configured yet; call configure() first")
        return self._assembly

    @property
    def manager(self) -> pluggy.PluginManager:
        return self.assembly.manager

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook

    @property
    def resources(self) -> ResourceManager:
        if self._resources is None:
            raise LifecycleError("the kernel is not configured yet; call configure() first")
        return self._resources

    @property
    def data_dir(self) -> Path:
        configured = str(self._config.get("kernel", {}).get("data_dir", ""))
        return Path(configured).expanduser() if configured else Path(
            platformdirs.user_data_dir("inferno", appauthor=False))

    def plugin_data_dir(self, section: str, name: str) -> Path:
        """A plugin's own folder in the data directory (not created here)."""
        return self.data_dir / section / name

    def drivers(self, kind: str) -> Mapping[str, Driver]:
        return dict(self._drivers.get(kind, {}))

    def provide(self, name: str, service: object) -> None:
        """Offer ``service`` to other plugins under ``name`` until the kernel stops."""
        if name in self._services and self._services[name] is not service:
            raise LifecycleError(f"a service named {name!r} is already provided")
        self._services[name] = service

    def service(self, name: str) -> Any:
        """What a plugin offered under ``name``."""
        try:
            return self._services[name]
        except KeyError:
            offered = ", ".join(sorted(self._services)) or "none"
            raise LookupError(f"no service named {name!r} (offered: {offered})") from None

    def masked_config(self) -> dict[str, Any]:
        """The whole configuration with every secret masked, for showing and logging."""
        return thaw(self._shown)  # type: ignore[no-any-return]

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Wrap each request: refused with ``Draining`` once shutdown began."""
        if not self._accepting:
            raise Draining(f"Inferno is {self.state} and accepts no new requests")
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    # ----------------------------------------------------------------------- lifecycle

    def configure(self) -> Kernel:
        """Load and register the profile's plugins and validate the whole configuration."""
        self._require(State.CREATED)
        self._assembly = assemble(self.layers, self._extra_plugins, self.log)
        self._config = freeze(self._assembly.settings.data)
        self._shown = freeze(masked(self._assembly.settings.data,
                                    self._assembly.secret_paths()))
        kernel_cfg = self._config["kernel"]
        self.bus.maxsize = int(kernel_cfg["event_queue_size"])
        self._resources = ResourceManager(self._budgets(), evict=self._evict)
        problems = []
        for name in self._plugin_names():
            path = self._assembly.plugin_path(name)
            try:
                loader.call_for(self.manager, name, "inferno_configure", config=self._section(
                    path, keep=name in self._assembly.hook_plugins))
            except ConfigError as exc:
                problems += exc.problems
            except Exception as exc:
                problems.append(ConfigProblem(path, f"{type(exc).__name__}: {exc}"))
        if problems:
            raise ConfigError(problems)
        self._set_state(State.CONFIGURED)
        self.log.debug("configured", files=[str(f) for f in self.layers.files],
                       plugins=self._plugin_names())
        return self

    async def start(self, *, protocols: bool = True) -> None:
        """Start every driver in order; on failure stop what started and raise ``PluginError``.

        ``protocols=False`` starts everything but the protocols: a command that runs one
        model in-process must not open the ports a running server holds."""
        if self._state is State.CREATED:
            self.configure()
        self._require(State.CONFIGURED)
        self._set_state(State.STARTING)
        self._idle.set()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._set_state(State.STOPPED)
            raise ConfigError([ConfigProblem(
                "kernel.data_dir", f"cannot create {self.data_dir}: {exc.strerror}",
                self.assembly.settings.source("kernel.data_dir"))]) from exc
        self._stack = AsyncExitStack()
        current = "kernel"
        try:
            for kind in KINDS:
                if kind.section == "protocols":
                    for name in self._plugin_names():
                        current = name
                        context = loader.call_for(self.manager, name, "inferno_lifespan",
                                                  kernel=self)
                        if context is not None:
                            await self._stack.enter_async_context(context)
                    self._accepting = True
                    if not protocols:
                        break
                for name, cls in self.assembly.drivers.get(kind.section, {}).items():
                    current = name
                    await self._start_driver(kind.section, name, cls)
            self._set_state(State.RUNNING)
            current = "inferno_kernel_ready"
            self.hook.inferno_kernel_ready(kernel=self)
        except BaseException as exc:
            self._accepting = False
            self.log.error("start failed, stopping what started", plugin_failed=current,
                           error=f"{type(exc).__name__}: {exc}")
            self._set_state(State.STOPPING)
            self._notify_stopping("start failed")
            await self._unwind()
            if isinstance(exc, Exception) and not isinstance(exc, PluginError):
                raise PluginError(current, f"failed to start: {type(exc).__name__}: {exc}"
                                  ) from exc
            raise
        self.log.info("ready", profile_files=[f.name for f in self.layers.files],
                      drivers={k: list(v) for k, v in self._drivers.items()},
                      data_dir=str(self.data_dir))

    async def stop(self, reason: str = "requested") -> None:
        """Refuse new requests, let in-flight ones finish (``drain_timeout``), stop in reverse."""
        if self._state not in (State.STARTING, State.RUNNING):
            return
        self._accepting = False
        self._set_state(State.STOPPING)
        self._notify_stopping(reason)
        timeout = float(self._config["kernel"]["drain_timeout"])
        if self._inflight:
            self.log.info("draining", inflight=self._inflight, timeout=timeout)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                self.log.warning("drain timed out", abandoned=self._inflight)
        await self._unwind()

    @asynccontextmanager
    async def running(self, *, protocols: bool = True) -> AsyncIterator[Kernel]:
        """``async with kernel.running():`` starts the kernel and always stops it."""
        await self.start(protocols=protocols)
        try:
            yield self
        finally:
            await self.stop()

    def shutdown(self, reason: str) -> None:
        """Make ``serve`` stop as SIGTERM would (for a protocol whose input ended)."""
        self._stop_reasons.append(reason)
        self._stop_requested.set()

    async def serve(self) -> int:
        """Run until SIGINT or SIGTERM (or ``shutdown``), then shut down gracefully; a second
        signal forces."""
        loop = asyncio.get_running_loop()
        stop_requested = self._stop_requested
        reasons = self._stop_reasons

        def on_signal(signum: signal.Signals) -> None:
            reasons.append(f"signal {signum.name}")
            if stop_requested.is_set():
                self.log.warning("second signal: not waiting for in-flight requests")
                self._idle.set()
            stop_requested.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            starting = asyncio.create_task(self.start())
            signalled = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal while a plugin is still starting
                self.log.info("start interrupted, stopping what started", reason=reasons[0])
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return 0
            signalled.cancel()
            starting.result()  # a failed start raises here
            await stop_requested.wait()
            self.log.info("shutting down", reason=reasons[0])
            await self.stop(reasons[0])
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return 0

    # ----------------------------------------------------------------------- internals

    async def _start_driver(self, section: str, name: str, cls: type[Driver]) -> None:
        assert self._stack is not None
        log = get_logger(name)
        context = DriverContext(name=name, kind=section, kernel=self, log=log,
                                config=self._section(f"{section}.{name}"))
        driver = cls(context)
        await driver.start()
        self._drivers.setdefault(section, {})[name] = driver
        self._stack.push_async_callback(self._stop_driver, section, name, driver)
        self.bus.publish(PluginStarted(plugin=name, kind=section))
        log.debug("started", kind=section)

    async def _stop_driver(self, section: str, name: str, driver: Driver) -> None:
        timeout = float(self._config["kernel"]["stop_timeout"])
        error = None
        try:
            await asyncio.wait_for(driver.stop(), timeout)
        except TimeoutError:
            error = f"did not stop within {timeout} s"
        except Exception as exc:  # one plugin failing to stop must not keep others running
            error = f"{type(exc).__name__}: {exc}"
        if error:
            self.log.error("plugin failed to stop", name=name, error=error)
        self._drivers.get(section, {}).pop(name, None)
        self.bus.publish(PluginStopped(plugin=name, kind=section, error=error))

    def _notify_stopping(self, reason: str) -> None:
        try:
            self.hook.inferno_kernel_stopping(kernel=self, reason=reason)
        except Exception as exc:  # a plugin's bug must not keep the others running
            self.log.error("inferno_kernel_stopping failed", error=f"{type(exc).__name__}: {exc}")

    async def _unwind(self) -> None:
        timeout = float(self._config["kernel"]["stop_timeout"])
        await self.bus.drain(timeout)  # let subscribers see what happened before they stop
        if self._stack is not None:
            try:
                await self._stack.aclose()
            except Exception as exc:
                self.log.error("error while stopping", error=f"{type(exc).__name__}: {exc}")
            self._stack = None
        self._services.clear()
        self._set_state(State.STOPPED)
        await self.bus.close(timeout)
        self.log.info("stopped")

    def _section(self, path: str, keep: bool = False) -> Mapping[str, Any]:
        node: Any = self._config
        for part in path.split("."):
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        return freeze({k: v for k, v in thaw(node).items() if keep or k != "enabled"})  # type: ignore[no-any-return]

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        """Hook plugin ``name``'s own section, secrets included, for that plugin's use."""
        return self._section(self.assembly.plugin_path(name), keep=True)

    def _plugin_names(self) -> list[str]:
        return [*self.assembly.hook_plugins,
                *(n for drivers in self.assembly.drivers.values() for n in drivers)]

    def _budgets(self) -> dict[str, int]:
        cfg = self._config["resources"]
        detected = detect_budgets()
        budgets = {
            "memory": detected["memory"] if cfg["memory"] == "auto" else parse_amount(
                cfg["memory"]),
            "cpu_threads": detected["cpu_threads"] if cfg["cpu_threads"] == "auto" else
            parse_amount(cfg["cpu_threads"]),
        }
        budgets.update({name: parse_amount(v) for name, v in cfg["budgets"].items()})
        return budgets

    def _evict(self, request: EvictionRequest) -> int:
        return sum(int(freed or 0) for freed in self.hook.inferno_evict(request=request))

    def _set_state(self, state: State) -> None:
        previous, self._state = self._state, state
        self.bus.publish(KernelStateChanged(state=state.value, previous=previous.value))

    def _require(self, *states: State) -> None:
        if self._state not in states:
            wanted = " or ".join(s.value for s in states)
            raise LifecycleError(f"the kernel is {self.state}; this needs it {wanted}")


__all__ = ["Kernel", "State"]
