"""The libvirt save-image prefix codec (vmarchive.format.saveimage)."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmarchive.errors import FormatError, UnsupportedVersionError
from vmarchive.format import saveimage as si

# The first 36 bytes of a header written by libvirt 9.0's own `virsh save` of the test
# guest (the rest of its 92 bytes are zero): version 2, data_len 67471, running,
# uncompressed, cookie at 1699.
LIBVIRT_HEADER = (
    b"LibvirtQemudSave" + bytes.fromhex("020000008f0701000100000000000000a3060000") + bytes(56)
)


def test_header_is_92_bytes_and_decodes_libvirts_own() -> None:
    assert si.HEADER_SIZE == 92
    h = si.decode_header(LIBVIRT_HEADER)
    assert h == si.SaveHeader(data_len=67471, was_running=True, cookie_offset=1699)
    assert h.encode() == LIBVIRT_HEADER
    assert h.stream_offset == 92 + 67471


xml_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=300
)


@given(xml=xml_text, cookie=st.none() | xml_text, running=st.booleans())
def test_prefix_round_trip(xml: str, cookie: str | None, running: bool) -> None:
    data = si.encode_prefix(xml, running=running, cookie=cookie, padding=100)
    assert len(data) % si.STREAM_ALIGN == 0  # the stream starts page-aligned
    p = si.decode_prefix(data)
    assert (p.xml, p.cookie, p.header.was_running) == (xml, cookie, running)
    assert p.header.stream_offset == len(data)
    f = io.BytesIO(data + b"QEVM")
    assert si.read_prefix(f) == p
    assert f.read() == b"QEVM"


def test_padding_leaves_slack() -> None:
    data = si.encode_prefix("<domain/>", running=True)
    assert len(data) - si.HEADER_SIZE - len("<domain/>") - 1 >= si.DEFAULT_PADDING


def _with(offset: int, value: int) -> bytes:
    b = bytearray(LIBVIRT_HEADER)
    struct.pack_into("<I", b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (LIBVIRT_HEADER[:91], FormatError),
        (b"LibvirtQemudPart" + LIBVIRT_HEADER[16:], FormatError),
        (b"X" * 16 + LIBVIRT_HEADER[16:], FormatError),
        (_with(16, 3), UnsupportedVersionError),
        (_with(28, 1), UnsupportedVersionError),  # compressed
        (_with(24, 2), FormatError),  # was_running
        (_with(32, 67471), FormatError),  # cookie at the very end
        (_with(20, si.MAX_DATA_LEN + 1), FormatError),
    ],
)
def test_bad_headers_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        si.decode_header(data)


def test_prefix_damage_refused() -> None:
    good = si.encode_prefix("<domain/>", running=False, cookie="<cookie/>")
    with pytest.raises(FormatError, match="truncated"):
        si.decode_prefix(good[:200])
    no_nul = bytearray(good)
    no_nul[si.HEADER_SIZE : -1] = b"x" * (len(good) - si.HEADER_SIZE - 1)
    no_nul[-1] = ord("x")
    with pytest.raises(FormatError, match="NUL"):
        si.decode_prefix(bytes(no_nul))
    with pytest.raises(FormatError, match="NUL"):
        si.encode_prefix("a\0b", running=True)


def test_negative_control_untouched_prefix_decodes() -> None:
    """The damage test above must fail only because of the damage."""
    good = si.encode_prefix("<domain/>", running=False, cookie="<cookie/>")
    assert si.decode_prefix(good).cookie == "<cookie/>"
