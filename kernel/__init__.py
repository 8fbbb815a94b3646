"""Inferno's kernel: lifecycle, configuration, plugin loading, events and resources.

The kernel knows nothing about model formats, network protocols or
authentication schemes: every capability is a plugin. Plugins import what they
need from here::

    from inferno.kernel import hookimpl, ConfigSpec, Protocol, DriverContext
"""

from .config import ConfigSpec
from .contracts import (
    KINDS,
    AuthError,
    AuthProvider,
    Backend,
    CacheTier,
    Chunk,
    Credentials,
    Driver,
    DriverContext,
    Exporter,
    GenerationRequest,
    Job,
    KernelHandle,
    LoadedModel,
    ModelSpec,
    PackageInfo,
    Principal,
    Protocol,
    Repository,
    Scheduler,
)
from .errors import (
    ConfigError,
    ConfigProblem,
    Draining,
    InfernoError,
    LifecycleError,
    PluginConflict,
    PluginError,
    ProfileNotFound,
    ResourceExhausted,
)
from .events import (
    Event,
    EventBus,
    KernelStateChanged,
    PluginStarted,
    PluginStopped,
    Subscription,
)
from .hookspecs import hookimpl, hookspec
from .kernel import Kernel, State
from .logs import get_logger, request_context
from .resources import EvictionRequest, Reservation, ResourceManager

__all__ = [
    "KINDS",
    "AuthError",
    "AuthProvider",
    "Backend",
    "CacheTier",
    "Chunk",
    "ConfigError",
    "ConfigProblem",
    "ConfigSpec",
    "Credentials",
    "Draining",
    "Driver",
    "DriverContext",
    "Event",
    "EventBus",
    "EvictionRequest",
    "Exporter",
    "GenerationRequest",
    "InfernoError",
    "Job",
    "Kernel",
    "KernelHandle",
    "KernelStateChanged",
    "LifecycleError",
    "LoadedModel",
    "ModelSpec",
    "PackageInfo",
    "PluginConflict",
    "PluginError",
    "PluginStarted",
    "PluginStopped",
    "Principal",
    "ProfileNotFound",
    "Protocol",
    "Repository",
    "Reservation",
    "ResourceExhausted",
    "ResourceManager",
    "Scheduler",
    "State",
    "Subscription",
    "get_logger",
    "hookimpl",
    "hookspec",
    "request_context",
]
