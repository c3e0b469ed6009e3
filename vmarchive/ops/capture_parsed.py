"""Bridge from the migration stream parser to store streams (ops layer).

Filled in against :mod:`vmarchive.format.migstream` once it lands.
"""

from __future__ import annotations

from typing import Any

from vmarchive.errors import StreamRefusedError


class ParsedConsumer:
    def __init__(self, w: Any) -> None:
        raise StreamRefusedError("the migration stream parser is not integrated yet")
