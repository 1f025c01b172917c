"""The generated fast decoders agree with the careful ones, on good and bad input alike.

A fast decoder may give up (``Fallback``) on anything; when it answers, the
careful decoder must give the same record, so the fast path never accepts
what the careful one refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire_messages import ALL_OPS, PLAIN, WRONG_VALUES, normalize, record_strategy

from corral.errors import ProtocolError
from corral.protocol import OPS, Encoder, decode
from corral.protocol.fast_decode import Fallback, decoder_of
from corral.protocol.messages import _generate_from_wire

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=60)


def wire_map(msg: Any) -> dict[str, Any]:
    """The op map a receiver decodes (frames referenced out of band resolved)."""
    [obj] = decode(Encoder().encode([msg]))
    return obj


def mutate(value: Any, draw: Any) -> Any:
    """``value`` with one entry somewhere inside replaced (or removed)."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        out = dict(value)
        choice = draw(st.sampled_from(["replace", "remove", "deeper"]))
        if choice == "remove":
            del out[key]
        elif choice == "deeper":
            out[key] = mutate(value[key], draw)
        else:
            out[key] = draw(PLAIN | st.sampled_from(WRONG_VALUES))
        return out
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        out = list(value)
        out[i] = mutate(value[i], draw) if draw(st.booleans()) else draw(PLAIN)
        return out
    return draw(PLAIN | st.sampled_from(WRONG_VALUES))


def careful(cls: type, obj: Any) -> Any:
    return _generate_from_wire(cls)(cls, obj)


@pytest.mark.parametrize("op", ALL_OPS)
@SETTINGS
@given(data=st.data())
def test_fast_and_careful_decoders_agree(op: str, data: st.DataObject) -> None:
    cls = OPS[op]
    obj = wire_map(data.draw(record_strategy(cls)))
    if data.draw(st.booleans()):
        obj = mutate(obj, data.draw)
    try:
        fast = decoder_of(cls)(obj)
    except Fallback:
        return  # the careful decoder decides
    assert normalize(careful(cls, obj)) == normalize(fast)


def test_valid_messages_take_the_fast_path() -> None:
    for cls in OPS.values():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if required:
            continue  # built by the round-trip tests; here only those with defaults
        obj = wire_map(cls())
        assert type(decoder_of(cls)(obj)) is cls


def test_a_refused_value_still_names_the_field() -> None:
    obj = {"op": "task_finished", "key": "k", "run_id": "1", "nbytes": 1}
    with pytest.raises(Fallback):
        decoder_of(OPS["task_finished"])(obj)
    with pytest.raises(ProtocolError, match=r"task_finished.*'run_id'.*integer"):
        OPS["task_finished"].from_wire(obj)
