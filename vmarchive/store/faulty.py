"""Fault-injecting backend wrapper (store layer, for tests).

Wraps any :class:`~vmarchive.store.backend.Backend` and makes chosen calls fail the way
real storage fails: an error before anything happened, an error after the object was
published (the acknowledgement was lost), or a read that returns damaged or truncated
bytes.  Every call is recorded, so tests can also assert on write ordering.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from vmarchive.errors import BackendError
from vmarchive.store.backend import Backend, ObjectInfo

Op = Literal["put", "get", "get_range", "stat", "list", "delete", "*"]
Mode = Literal["error", "error_after", "corrupt", "truncate"]


@dataclass
class Fault:
    """Fail matching calls.

    ``op`` and ``key_prefix`` select calls; the first ``skip`` matches pass, then
    ``times`` matches fail (``-1``: all).  Modes: ``error`` raises before the call,
    ``error_after`` performs the call then raises (a lost acknowledgement), ``corrupt``
    flips one bit of what a read returns, ``truncate`` returns half of it.
    """

    op: Op
    key_prefix: str = ""
    mode: Mode = "error"
    skip: int = 0
    times: int = 1
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def matches(self, op: str, key: str) -> bool:
        if self.op not in ("*", op) or not key.startswith(self.key_prefix):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times >= 0 and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class InjectedFault(BackendError):
    """The error a :class:`FaultyBackend` raises."""

    title = "injected fault"


class FaultyBackend(Backend):
    """A backend that delegates to ``inner`` and fails the calls the faults select."""

    def __init__(self, inner: Backend, faults: list[Fault] | None = None) -> None:
        self.inner = inner
        self.location = inner.location
        self.faults: list[Fault] = list(faults or [])
        #: (op, key) of every call, in order.
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _fault(self, op: str, key: str) -> Fault | None:
        with self._lock:
            self.calls.append((op, key))
            for f in self.faults:
                if f.matches(op, key):
                    return f
        return None

    @staticmethod
    def _raise(op: str, key: str) -> None:
        raise InjectedFault(f"injected failure of {op} {key!r}", key=key)

    def _damage(self, fault: Fault, data: bytes, op: str, key: str) -> bytes:
        if fault.mode == "corrupt" and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        if fault.mode == "truncate":
            return data[: len(data) // 2]
        if fault.mode == "error_after":
            self._raise(op, key)
        return data

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> bool:
        fault = self._fault("put", key)
        if fault is not None and fault.mode == "error":
            self._raise("put", key)
        created = self.inner.put(key, data, create_only=create_only)
        if fault is not None:
            self._raise("put", key)
        return created

    def get(self, key: str) -> bytes:
        fault = self._fault("get", key)
        if fault is not None and fault.mode == "error":
            self._raise("get", key)
        data = self.inner.get(key)
        return self._damage(fault, data, "get", key) if fault else data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fault = self._fault("get_range", key)
        if fault is not None and fault.mode == "error":
            self._raise("get_range", key)
        data = self.inner.get_range(key, offset, length)
        return self._damage(fault, data, "get_range", key) if fault else data

    def stat(self, key: str) -> ObjectInfo:
        fault = self._fault("stat", key)
        if fault is not None and fault.mode == "error":
            self._raise("stat", key)
        info = self.inner.stat(key)
        if fault is not None and fault.mode == "error_after":
            self._raise("stat", key)
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        fault = self._fault("list", prefix)
        if fault is not None and fault.mode == "error":
            self._raise("list", prefix)
        items = list(self.inner.list(prefix))
        if fault is not None and fault.mode == "truncate":
            items = items[: len(items) // 2]
        elif fault is not None and fault.mode == "error_after":
            self._raise("list", prefix)
        return iter(items)

    def delete(self, key: str) -> None:
        fault = self._fault("delete", key)
        if fault is not None and fault.mode == "error":
            self._raise("delete", key)
        self.inner.delete(key)
        if fault is not None:
            self._raise("delete", key)

    def will_read_back(self, key: str, data: bytes | memoryview) -> None:
        self.inner.will_read_back(key, data)

    def done_reading_back(self, keys: Iterable[str]) -> None:
        self.inner.done_reading_back(keys)

    def set_read_order(self, following: Callable[[str], str | None]) -> None:
        self.inner.set_read_order(following)

    def clean_temporaries(self, older_than: float) -> int:
        return self.inner.clean_temporaries(older_than)

    def close(self) -> None:
        self.inner.close()
