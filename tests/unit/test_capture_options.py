"""CaptureOptions refuses what can only be a mistake before anything is touched."""

from __future__ import annotations

import pytest

from vmarchive.errors import UsageError
from vmarchive.ops.capture import CaptureOptions


@pytest.mark.parametrize("tag", ["", "   ", "a\nb", "tab\there", "bell\x07"])
def test_empty_or_control_character_tags_are_refused(tag: str) -> None:
    with pytest.raises(UsageError, match="empty or has control characters"):
        CaptureOptions(domain="g", repo="/r", tags=("ok", tag))


@pytest.mark.parametrize("tag", ["pre-upgrade", "before patch 7", "ünïcode", "x" * 300])
def test_ordinary_tags_are_accepted(tag: str) -> None:
    # the control: the check does not refuse what a user types as a tag
    assert CaptureOptions(domain="g", repo="/r", tags=(tag,)).tags == (tag,)
