"""Named resource budgets: memory bytes, CPU threads, GPU devices and their memory.

A reservation that does not fit asks the eviction callback (the kernel wires it
to the ``inferno_evict`` hook) to free room, then fails with a clear error if
there still is not enough.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import ResourceExhausted

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_amount(value: int | float | str) -> int:
    """``8589934592``, ``"8GiB"``, ``"512 MB"`` → an integer amount."""
    if isinstance(value, bool):
        raise ValueError(f"not an amount: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not an amount: {value!r} (use a number or e.g. '8GiB', '512MB')")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def detect_budgets() -> dict[str, int]:
    """What this machine has: physical memory and the CPU threads this process may use."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"memory": memory, "cpu_threads": threads or 1}


@dataclass(frozen=True)
class EvictionRequest:
    """Passed to ``inferno_evict``: free ``amount`` of ``resource`` for ``owner``."""

    resource: str
    amount: int
    owner: str


class Reservation:
    """Holds ``amount`` of ``resource`` until released (idempotent)."""

    def __init__(self, manager: ResourceManager, resource: str, amount: int, owner: str) -> None:
        self.manager = manager
        self.resource = resource
        self.amount = amount
        self.owner = owner
        self.released = False

    def release(self) -> None:
        self.manager._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Reservation {self.owner}: {self.amount} {self.resource}>"


class ResourceManager:
    """Budgets by name, with thread-safe reserve and release."""

    def __init__(self, budgets: Mapping[str, int],
                 evict: Callable[[EvictionRequest], int] | None = None) -> None:
        self._capacity = dict(budgets)
        self._reservations: dict[str, list[Reservation]] = {name: [] for name in budgets}
        self._lock = threading.RLock()
        self._evictors: list[Callable[[EvictionRequest], int]] = [evict] if evict else []

    def add_evictor(self, evict: Callable[[EvictionRequest], int]) -> Callable[[], None]:
        """Also ask ``evict`` to free room (a plugin's per-kernel object, such as the model
        manager); returns the function that removes it again."""
        self._evictors.append(evict)
        return lambda: self._evictors.remove(evict) if evict in self._evictors else None

    def add_budget(self, resource: str, capacity: int) -> None:
        """Declare a resource found at run time (a backend adds ``gpu:0`` and ``gpu:0:memory``)."""
        with self._lock:
            self._capacity[resource] = capacity
            self._reservations.setdefault(resource, [])

    def capacity(self, resource: str) -> int:
        return self._capacity[self._known(resource)]

    def used(self, resource: str) -> int:
        with self._lock:
            return sum(r.amount for r in self._reservations[self._known(resource)])

    def available(self, resource: str) -> int:
        return self.capacity(resource) - self.used(resource)

    def reserve(self, resource: str, amount: int, owner: str) -> Reservation:
        """Reserve or raise ``ResourceExhausted``; use as a context manager or ``release()``."""
        resource = self._known(resource)
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount}) of {resource}")
        with self._lock:
            if amount > self._capacity[resource]:
                raise ResourceExhausted(
                    f"{owner} needs {amount} {resource} but the whole budget is "
                    f"{self._capacity[resource]}; raise [resources.budgets] {resource}")
            self._make_room(resource, amount, owner)
            reservation = Reservation(self, resource, amount, owner)
            self._reservations[resource].append(reservation)
            return reservation

    @contextmanager
    def reserved(self, resource: str, amount: int, owner: str) -> Iterator[Reservation]:
        reservation = self.reserve(resource, amount, owner)
        try:
            yield reservation
        finally:
            reservation.release()

    def usage(self) -> dict[str, dict[str, Any]]:
        """Per resource: capacity, used, available and who holds what."""
        with self._lock:
            return {
                name: {
                    "capacity": self._capacity[name],
                    "used": sum(r.amount for r in held),
                    "available": self._capacity[name] - sum(r.amount for r in held),
                    "holders": {r.owner: r.amount for r in held},
                }
                for name, held in self._reservations.items()
            }

    def _make_room(self, resource: str, amount: int, owner: str) -> None:
        while self._capacity[resource] - self.used(resource) < amount:
            missing = amount - (self._capacity[resource] - self.used(resource))
            before = self.used(resource)
            request = EvictionRequest(resource, missing, owner)
            freed = 0
            for evict in list(self._evictors):
                freed += evict(request)
                if self._capacity[resource] - self.used(resource) >= amount:
                    break
            if freed <= 0 or self.used(resource) >= before:  # nothing was really released
                raise ResourceExhausted(
                    f"{owner} needs {amount} {resource} but only "
                    f"{self._capacity[resource] - self.used(resource)} of "
                    f"{self._capacity[resource]} is free and nothing could be evicted "
                    f"(held by: {self._holders(resource)})")

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if not reservation.released:
                reservation.released = True
                self._reservations[reservation.resource].remove(reservation)

    def _holders(self, resource: str) -> str:
        held = self._reservations[resource]
        return ", ".join(f"{r.owner}={r.amount}" for r in held) or "nobody"

    def _known(self, resource: str) -> str:
        if resource not in self._capacity:
            names = ", ".join(sorted(self._capacity))
            raise KeyError(f"no resource budget named {resource!r} (budgets: {names})")
        return resource
