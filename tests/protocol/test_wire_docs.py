"""docs/protocol.md documents every op and every field of protocol/messages.py.

Another language's client or worker is written from that document, so it must
not drift from the code: adding an op or a field means documenting it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest

from corral.protocol import OPS, PROTOCOL_VERSION
from corral.protocol.framing import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_FRAMES
from corral.protocol.messages import Record

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def sections() -> dict[str, str]:
    """``#### `name` `` heading -> the text up to the next heading."""
    text = DOC.read_text()
    parts = re.split(r"^(#{1,4}) (.*)$", text, flags=re.M)
    out = {}
    for i in range(1, len(parts) - 2, 3):
        title = parts[i + 1].strip()
        match = re.fullmatch(r"`(\w+)`", title)
        if match:
            out[match.group(1)] = parts[i + 2]
    return out


def nested_records(tp: Any, found: set[type[Record]]) -> None:
    if isinstance(tp, type) and issubclass(tp, Record):
        if tp not in found:
            found.add(tp)
            for hint in typing.get_type_hints(tp).values():
                nested_records(hint, found)
        return
    if typing.get_origin(tp) in (list, dict, Union, types.UnionType):
        for arg in typing.get_args(tp):
            nested_records(arg, found)


def documented_names() -> list[tuple[str, type[Record]]]:
    records: set[type[Record]] = set()
    for cls in OPS.values():
        for hint in typing.get_type_hints(cls).values():
            nested_records(hint, records)
    named = [(op, cls) for op, cls in OPS.items()]
    named += [(cls.__name__, cls) for cls in records]
    return sorted(named, key=lambda item: item[0])


@pytest.mark.parametrize(("name", "cls"), documented_names())
def test_every_op_and_record_has_a_section_listing_its_fields(name: str, cls: type[Record]) -> None:
    doc = sections()
    assert name in doc, f"docs/protocol.md has no '#### `{name}`' section"
    rows = set(re.findall(r"^\| `(\w+)` \|", doc[name], flags=re.M))
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    assert fields - rows == set(), f"fields of {name} missing from its table"
    assert rows - fields == set(), f"the table of {name} lists fields the code lacks"


def test_required_columns_match_the_code() -> None:
    doc = sections()
    for name, cls in documented_names():
        required = {
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        for field, flag in re.findall(r"^\| `(\w+)` \| [^|]+ \| (\w+)", doc[name], flags=re.M):
            assert (flag == "yes") == (field in required), f"{name}.{field}: required is {flag!r}"


def test_constants_in_the_doc_match_the_code() -> None:
    text = DOC.read_text()
    assert f"version {PROTOCOL_VERSION}" in text
    assert f"{DEFAULT_MAX_FRAMES:,}" in text
    assert f"{DEFAULT_MAX_FRAME_BYTES:,}" in text


def hex_blocks_after(marker: str) -> list[bytes]:
    """The bytes of each code block following a line starting with ``marker``."""
    text = DOC.read_text()
    blocks = re.findall(rf"^{re.escape(marker)}.*?\n```\n(.*?)```", text, flags=re.M | re.S)
    out = []
    for block in blocks:
        data = bytearray()
        for line in block.splitlines():
            for token in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", token):
                    break
                data.append(int(token, 16))
        out.append(bytes(data))
    return out


def test_the_worked_hex_examples_decode_as_the_doc_says() -> None:
    from corral.protocol import FrameDecoder, decode, decode_message

    first, second = hex_blocks_after("On the wire")
    declared = [int(n) for n in re.findall(r"^On the wire \((\d+) bytes\)", DOC.read_text(), re.M)]
    assert declared == [len(first), len(second)]
    [frames] = FrameDecoder().feed(first)
    assert [decode_message(m) for m in decode(frames)] == [OPS["get_data"](keys=["x"])]
    [frames] = FrameDecoder().feed(second)
    assert len(frames) == 2 and bytes(frames[1]) == b"\x2a"
    assert decode(frames) == [
        {"op": "store", "data": {"k": {"serializer": "msgpack", "frames": [b"\x2a"]}}}
    ]


def test_the_hmac_example_is_right() -> None:
    import hashlib
    import hmac

    digest = hmac.new(b"secret", bytes(range(32)), hashlib.sha256).hexdigest()
    assert f"`{digest}`" in DOC.read_text()


def test_handshake_limits_in_the_doc_match_the_code() -> None:
    from corral.comm.connection import HANDSHAKE_MAX_FRAME_BYTES, HANDSHAKE_MAX_FRAMES
    from corral.comm.handshake import HANDSHAKE_TIMEOUT

    text = DOC.read_text()
    assert HANDSHAKE_MAX_FRAME_BYTES == 1024**2
    assert f"**{HANDSHAKE_MAX_FRAMES}\n  frames of at most 1 MiB**" in text
    assert f"{HANDSHAKE_MAX_FRAME_BYTES:,}" in text
    assert f"**{HANDSHAKE_TIMEOUT:g} seconds**" in text
