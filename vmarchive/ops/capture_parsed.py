"""Bridge from the migration stream parser to store streams (ops layer).

Filled in against :mod:`vmarchive.format.migstream` once it lands.
"""

from __future__ import annotations

from typing import Any

from vmarchive.errors import StreamRefusedError


class ParsedConsumer:
    def __init__(self, w: Any) -> None:
        raise StreamRefusedError("the migration stream parser is not integrated yet")

    def feed(self, data: memoryview) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def close_streams(self) -> int:
        raise NotImplementedError
