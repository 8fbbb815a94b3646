"""The ``audit`` hook plugin: the tamper-evident audit log, offered as the ``audit`` service.

Its settings are the top-level ``[audit]`` section (``INFERNO_AUDIT__KEY`` sets the key).
With ``enabled = true`` the log opens at start; other plugins record through
``kernel.service("audit").record(...)``, and the model manager's lifecycle events on the
bus are recorded here. ``inferno audit verify | query | export | keygen`` read it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import click

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, Event, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from .keys import key_problems
from .settings import DEFAULTS, SECRETS, SECTION, VALIDATORS

log = get_logger("audit")


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(section=SECTION, defaults=DEFAULTS, validators=VALIDATORS, secrets=SECRETS)


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    problems = [ConfigProblem(path, message) for path, message in key_problems(config)]
    if problems:
        raise ConfigError(problems)


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None] | None:
    """The log opens when the kernel starts, and without a key it does not start: the key
    comes with the deployment (INFERNO_AUDIT__KEY), so a profile shows and validates
    without one."""
    if not kernel.config[SECTION]["enabled"]:
        return None
    return _serve(kernel)


@hookimpl
def inferno_cli_commands() -> Sequence[click.Command]:
    from .cli import audit

    return [audit]


@asynccontextmanager
async def _serve(kernel: KernelHandle) -> AsyncIterator[None]:
    from .errors import AuditError
    from .keys import keyring_from
    from .log import AuditLog
    from .settings import AuditSettings, own_section

    section = own_section(kernel)
    try:
        keyring = keyring_from(section)
    except AuditError as exc:
        raise ConfigError([ConfigProblem("audit.key", str(exc))]) from None
    audit = await AuditLog.open(AuditSettings.from_section(section, kernel.data_dir), keyring,
                                log)
    kernel.provide("audit", audit)
    subscription = kernel.bus.subscribe(Event, lambda event: _record_event(audit, event),
                                        replay=True)
    log.info("audit log open", directory=str(audit.directory), key_id=audit.key.id,
             seq=audit.seq, fsync=audit.settings.fsync, fail_closed=audit.fail_closed)
    try:
        yield
    finally:
        await subscription.close()
        await audit.close()


#: Bus topics recorded, and the action each becomes.
_MODEL_ACTIONS = {"model.loaded": "models.load", "model.unloaded": "models.unload",
                  "model.swapped": "models.update"}
#: ``model.failed`` stages, and the action that failed.
_FAILED_STAGES = {"load": "models.load", "verify": "models.load", "swap": "models.update",
                  "rollback": "models.rollback"}
#: Kernel states recorded: a server (or a command that starts the kernel) starting and
#: stopping is an administrative act worth a line.
_KERNEL_ACTIONS = {"running": "kernel.start", "stopping": "kernel.stop"}
_SKIPPED_FIELDS = frozenset({"time", "model", "error"})


async def _record_event(audit: Any, event: Event) -> None:
    """Record a model lifecycle or configuration event; a failure is logged, not raised
    (nobody waits on a bus event to refuse it)."""
    topic = event.topic
    if topic == "model.failed":
        action, outcome = _FAILED_STAGES.get(str(getattr(event, "stage", "")), "models.load"), \
            "failed"
    elif topic == "model.swapped" and getattr(event, "rollback", False):
        action, outcome = "models.rollback", "ok"
    elif topic in _MODEL_ACTIONS:
        action, outcome = _MODEL_ACTIONS[topic], "ok"
    elif topic == "kernel.state" and getattr(event, "state", "") in _KERNEL_ACTIONS:
        action, outcome = _KERNEL_ACTIONS[event.state], "ok"  # type: ignore[attr-defined]
    elif topic.startswith("config."):
        action, outcome = topic, str(getattr(event, "outcome", "ok"))
    else:
        return
    fields = {name: value for name, value in vars(event).items() if name not in _SKIPPED_FIELDS}
    if getattr(event, "error", None):
        fields["error"] = str(event.error)  # type: ignore[attr-defined]
    try:
        await audit.record(action, outcome,
                           principal=getattr(event, "principal", None) or "system",
                           resource=str(getattr(event, "model", "") or ""), details=fields)
    except Exception as exc:
        log.error("could not record an event in the audit log", topic=topic, error=str(exc))
