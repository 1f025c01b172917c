"""Every op of protocol/messages.py: round trips, and strict validation of what arrives."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import ProtocolError
from corral.protocol import OPS, Encoder, Payload, decode, decode_message
from corral.protocol.framing import FrameDecoder, encode_frames
from corral.protocol.messages import (
    ComputeTask,
    ErrorInfo,
    Record,
    TaskSpec,
    UpdateGraph,
)
from corral.protocol.serialize import OUT_OF_BAND_MIN

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=25)

# msgpack-representable plain data (what ``Any`` fields may carry)
PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)

FRAMES = st.lists(
    st.binary(max_size=20) | st.sampled_from([b"\x01" * OUT_OF_BAND_MIN, b"\x02" * 100_000]),
    max_size=3,
)
PAYLOADS = st.builds(Payload, st.sampled_from(["pickle", "msgpack", "json"]), FRAMES)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy producing valid values for a field annotation of messages.py."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return PLAIN
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if tp is str:
        return st.text(max_size=12)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**63), 2**64 - 1)
    if tp is float:
        return st.floats(allow_nan=False) | st.integers(-(2**53), 2**53)
    if tp is bytes:
        return st.binary(max_size=40)
    if tp is Payload:
        return PAYLOADS
    if isinstance(tp, type) and issubclass(tp, Record):
        return record_strategy(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(strategy_for(item), max_size=3)
    if origin is dict:
        _, value = typing.get_args(tp)
        return st.dictionaries(st.text(max_size=6), strategy_for(value), max_size=3)
    raise AssertionError(f"no strategy for {tp!r}: extend this test")


def record_strategy(cls: type[Record]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return st.builds(cls, **fields)


def wire_round_trip(msg: Any) -> Any:
    """Encode, frame, deframe, decode and validate, as a connection does."""
    stream = b"".join(bytes(b) for b in encode_frames(Encoder().encode([msg])))
    [frames] = FrameDecoder().feed(stream)
    [obj] = decode(frames)
    return decode_message(obj)


def normalize(value: Any) -> Any:
    """``None`` fields are left out on the wire and come back as their defaults."""
    if isinstance(value, Record):
        out = {}
        for f in dataclasses.fields(value):  # type: ignore[arg-type]
            v = getattr(value, f.name)
            if v is None and f.default_factory is not dataclasses.MISSING:
                v = f.default_factory()
            out[f.name] = normalize(v)
        return (type(value).__name__, out)
    if isinstance(value, Payload):
        return (value.serializer, [bytes(f) for f in value.frames])
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


ALL_OPS = sorted(OPS)


def test_the_op_table_is_consistent() -> None:
    assert len(OPS) >= 27
    for name, cls in OPS.items():
        assert cls.op == name
        assert issubclass(cls, Record)


@pytest.mark.parametrize("op", ALL_OPS)
@DETERMINISTIC
@given(data=st.data())
def test_every_op_round_trips(op: str, data: st.DataObject) -> None:
    msg = data.draw(record_strategy(OPS[op]))
    got = wire_round_trip(msg)
    assert type(got) is OPS[op]
    assert normalize(got) == normalize(msg)


@pytest.mark.parametrize("op", ALL_OPS)
def test_minimal_op_round_trips(op: str) -> None:
    msg = minimal(OPS[op])
    assert wire_round_trip(msg) == msg


# -- building valid maps to break -----------------------------------------------------
def minimal_value(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is str:
        return "s"
    if tp is int:
        return 1
    if tp is bool:
        return True
    if tp is float:
        return 1.5
    if tp is bytes:
        return b"b"
    if tp is Payload:
        return Payload("pickle", [b"x"])
    if isinstance(tp, type) and issubclass(tp, Record):
        return minimal(tp)
    if origin is list:
        return [minimal_value(typing.get_args(tp)[0])]
    if origin is dict:
        return {"k": minimal_value(typing.get_args(tp)[1])}
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return minimal_value(inner)
    return "anything"


def minimal(cls: type[Record]) -> Any:
    """An instance with every field (optional ones too) set to a simple valid value."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: minimal_value(hints[f.name]) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def plain_map(msg: Any) -> dict[str, Any]:
    """The map a peer would send (payload frames in band)."""
    [obj] = msgpack.unpackb(Encoder().encode([msg])[0], raw=False)
    return obj


def fields_of(cls: type[Record]) -> list[tuple[str, Any, bool]]:
    hints = typing.get_type_hints(cls)
    return [
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    ]


REQUIRED = [(op, name) for op in ALL_OPS for name, _, required in fields_of(OPS[op]) if required]


@pytest.mark.parametrize(("op", "field"), REQUIRED)
def test_missing_required_field_names_op_and_field(op: str, field: str) -> None:
    obj = plain_map(minimal(OPS[op]))
    del obj[field]
    with pytest.raises(ProtocolError) as info:
        decode_message(obj)
    assert op in str(info.value) and repr(field) in str(info.value)
    assert "missing" in str(info.value)


# Values of many types: for each typed field, the first one it rejects is used.
WRONG_VALUES: list[Any] = [
    12345,
    "text",
    True,
    1.5,
    b"bin",
    [1],
    [[1]],
    {"k": 1},
    {"k": [1]},
    {1: 1},
]


def rejects(op: str, field: str, value: Any) -> bool:
    obj = plain_map(minimal(OPS[op]))
    obj[field] = value
    try:
        decode_message(obj)
    except ProtocolError:
        return True
    return False


TYPED = [(op, name) for op in ALL_OPS for name, tp, _ in fields_of(OPS[op]) if tp is not Any]


@pytest.mark.parametrize(("op", "field"), TYPED)
def test_mistyped_field_names_op_and_field(op: str, field: str) -> None:
    wrong = [v for v in WRONG_VALUES if rejects(op, field, v)]
    assert len(wrong) >= 5, f"{op}.{field} accepts too much: only {wrong} rejected"
    for value in wrong:
        obj = plain_map(minimal(OPS[op]))
        obj[field] = value
        with pytest.raises(ProtocolError) as info:
            decode_message(obj)
        assert op in str(info.value) and repr(field) in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("key", 7, "expected str, got int"),
        ("run_id", "7", "expected an integer, got str"),
        ("run_id", True, "expected an integer, got bool"),
        ("nbytes", 1.0, "expected an integer, got float"),
        ("result", {"serializer": "pickle", "frames": ["text"]}, "payload frames must be binary"),
        ("result", {"frames": []}, "malformed payload"),
        ("start", "now", "expected a number, got str"),
        ("typename", 5, "expected a string, got int"),
    ],
)
def test_type_errors_say_what_was_expected(field: str, value: Any, expected: str) -> None:
    obj = {"op": "task_finished", "key": "k", "run_id": 1, "nbytes": 1, field: value}
    with pytest.raises(ProtocolError, match=expected):
        decode_message(obj)


def test_errors_in_nested_records_name_the_path() -> None:
    obj = plain_map(minimal(OPS["compute"]))
    obj["tasks"].append(dict(obj["tasks"][0], run_id="x"))
    with pytest.raises(ProtocolError) as info:
        decode_message(obj)
    text = str(info.value)
    assert "compute" in text and "'tasks'" in text and "item 1" in text and "'run_id'" in text
    assert "ComputeTask" in text


def test_errors_in_maps_name_the_key() -> None:
    obj = {"op": "add_keys", "nbytes": {"good": 1, "bad": "x"}}
    with pytest.raises(ProtocolError, match=r"add_keys.*'nbytes'.*key 'bad'.*integer"):
        decode_message(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "scatter", "id": 1, "data": {5: {"serializer": "p", "frames": []}}, "nbytes": {}},
        {"op": "add_keys", "nbytes": {b"k": 1}},
        {"op": "request", "id": 1, "method": "who_has", "args": {(1, 2): 1}},
        {"op": "register_worker", "address": "a", "nthreads": 1, "resources": {1: 1.0}},
    ],
)
def test_map_keys_must_be_strings(obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="map keys must be strings"):
        decode_message(obj)


@pytest.mark.parametrize(
    "obj",
    [
        # the scheduler sorts priorities and compares resource amounts: numbers only
        {"op": "update_graph", "wanted": [], "tasks": [
            {"key": "k", "args": {"serializer": "pickle", "frames": []}, "priority": ["high"]}
        ]},
        {"op": "register_worker", "address": "a", "nthreads": 1, "resources": {"GPU": "two"}},
        {"op": "update_graph", "wanted": [], "tasks": [
            {"key": "k", "args": {"serializer": "pickle", "frames": []}, "resources": {"GPU": None}}
        ]},
    ],
)  # fmt: skip
def test_values_the_scheduler_compares_must_be_numbers(obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="expected a number"):
        decode_message(obj)


@pytest.mark.parametrize("op", [None, "", "nope", "Task_Finished", 5, b"compute", ["compute"]])
def test_unknown_ops_are_rejected_by_name(op: Any) -> None:
    obj = {"keys": []} if op is None else {"op": op, "keys": []}
    with pytest.raises(ProtocolError, match=f"unknown op {op!r}".replace("[", r"\[")):
        decode_message(obj)


def test_none_means_default_and_unknown_fields_are_ignored() -> None:
    spec = {
        "key": "k",
        "args": {"serializer": "pickle", "frames": [b"x"]},
        "deps": None,
        "priority": None,
        "retries": None,
        "from_a_newer_version": {"anything": [1, 2]},
    }
    msg = decode_message({"op": "update_graph", "tasks": [spec], "wanted": ["k"], "x": 1})
    assert isinstance(msg, UpdateGraph)
    [task] = msg.tasks
    assert task.deps == [] and task.priority == [] and task.retries == 0
    assert task.fn is None and task.runtime is None


def test_required_field_sent_as_none_is_rejected() -> None:
    with pytest.raises(ProtocolError, match=r"get_data.*'keys'"):
        decode_message({"op": "get_data", "keys": None})


def test_integers_are_numbers_but_booleans_are_not() -> None:
    msg = decode_message({"op": "task_finished", "key": "k", "run_id": 1, "nbytes": 0, "start": 3})
    assert msg.start == 3  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="expected a number, got bool"):
        decode_message({"op": "task_finished", "key": "k", "run_id": 1, "nbytes": 0, "stop": True})


def test_records_nested_in_messages_are_typed() -> None:
    obj = plain_map(minimal(OPS["key_erred"]))
    msg = decode_message(obj)
    assert isinstance(msg.error, ErrorInfo)  # type: ignore[attr-defined]
    obj = plain_map(minimal(OPS["compute"]))
    assert isinstance(decode_message(obj).tasks[0], ComputeTask)  # type: ignore[attr-defined]
    obj = plain_map(minimal(OPS["update_graph"]))
    assert isinstance(decode_message(obj).tasks[0], TaskSpec)  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [[], "map", 5, None])
def test_nested_records_must_be_maps(bad: Any) -> None:
    obj = plain_map(minimal(OPS["key_erred"]))
    obj["error"] = bad
    with pytest.raises(ProtocolError, match=r"key_erred.*'error'"):
        decode_message(obj)
