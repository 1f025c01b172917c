"""Generated decoders for the happy path: a received map that is exactly right.

Every message is decoded on the hot path, and almost every one is valid.
:func:`generate` compiles, per record class, one function that checks each
field with inline ``type(v) is ...`` tests (no converter call per field,
nested records and payloads checked in the same function) and builds the
record from positional arguments.  It is at least as strict as the careful
decoder in :mod:`~corral.protocol.messages`: anything unusual, valid or not,
raises :class:`Fallback`, and the careful decoder then runs and either
accepts the value or names exactly what is wrong.  So errors read the same
as ever, and the fast path never accepts what the careful one refuses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from .serialize import Payload

#: Decoders by record class, for records nested in others.
_FAST: dict[type, Callable[[Any], Any]] = {}


class Fallback(Exception):
    """The fast decoder cannot vouch for a value: use the careful one."""


_BINARY = (bytes, bytearray, memoryview)


class _Gen:
    """Source lines of one decoder, with the names they refer to."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"_{stem}{self.counter}"  # never a field's name (field_N)

    def check(self, tp: Any, var: str) -> tuple[list[str], bool]:
        """Lines that check (and maybe convert in place) ``var`` of type ``tp``.

        Returns the lines and whether they rebind ``var`` (a converted value).
        Every failure raises ``Fallback``.
        """
        origin = typing.get_origin(tp)
        if tp is Any:
            return [], False
        if origin in (Union, types.UnionType):
            others = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(others) != 1:
                return [], False  # the careful decoder takes anything here too
            inner, converts = self.check(others[0], var)
            if not inner:
                return [], False
            return [f"if {var} is not None:", *_indent(inner)], converts
        if tp in (str, bool, int):
            return [f"if type({var}) is not {tp.__name__}: raise Fallback"], False
        if tp is float:
            return [
                f"if type({var}) is not float and type({var}) is not int: raise Fallback"
            ], False
        if tp is bytes:
            return [f"if type({var}) not in BINARY: raise Fallback"], False
        if tp is Payload:
            return self._payload(var), True
        if isinstance(tp, type) and tp in _FAST:
            name = f"fast_{tp.__name__}"
            self.env[name] = _FAST[tp]
            return [f"{var} = {name}({var})"], True
        if origin is list or tp is list:
            (item,) = typing.get_args(tp) or (Any,)
            return self._list(item, var), True
        if origin is dict or tp is dict:
            key, value = typing.get_args(tp) or (Any, Any)
            return self._dict(key, value, var), True
        raise TypeError(f"no fast decoder for field type {tp!r}")

    def _payload(self, var: str) -> list[str]:
        serializer, frames, frame = self.fresh("ser"), self.fresh("frames"), self.fresh("f")
        return [
            f"if type({var}) is dict:",
            f"    {serializer} = {var}.get('serializer')",
            f"    {frames} = {var}.get('frames')",
            f"    if type({serializer}) is not str or type({frames}) is not list:",
            "        raise Fallback",
            f"    for {frame} in {frames}:",
            f"        if type({frame}) not in BINARY: raise Fallback",
            f"    {var} = Payload({serializer}, {frames})",
            f"elif type({var}) is not Payload:",
            "    raise Fallback",
        ]

    def _item(self, tp: Any) -> tuple[list[str], bool, str]:
        """Lines checking a container item ``x``: inline if check-only, else a helper."""
        x = self.fresh("x")
        lines, converts = self.check(tp, x)
        if not converts:
            return lines, False, x
        helper = self.fresh("item")
        source = "\n".join([f"def {helper}({x}):", *_indent(lines), f"    return {x}"])
        exec(source, self.env)
        return [], True, helper

    def _list(self, item: Any, var: str) -> list[str]:
        lines = [f"if type({var}) is not list: raise Fallback"]
        check, converts, name = self._item(item)
        if converts:
            lines.append(f"{var} = [{name}(x) for x in {var}]")
        elif check:
            lines += [f"for {name} in {var}:", *_indent(check)]
        return lines

    def _dict(self, key: Any, value: Any, var: str) -> list[str]:
        lines = [f"if type({var}) is not dict: raise Fallback"]
        check, converts, name = self._item(value)
        k = self.fresh("k")
        key_check = [f"if type({k}) is not str: raise Fallback"] if key is str else []
        if converts:
            if key_check:
                lines += [f"for {k} in {var}:", *_indent(key_check)]
            lines.append(f"{var} = {{k: {name}(x) for k, x in {var}.items()}}")
        elif check or key_check:
            lines += [f"for {k}, {name} in {var}.items():", *_indent(key_check + check)]
        return lines


def default_expression(field: Any, env: dict[str, Any], name: str) -> str:
    """Source of an expression giving ``field``'s default, binding what it needs in ``env``."""
    if field.default_factory is not dataclasses.MISSING:
        env[name] = field.default_factory
        return f"{name}()"
    env[name] = field.default
    return name


def decoder_of(cls: type) -> Callable[[Any], Any]:
    """The fast decoder generated for record class ``cls``."""
    return _FAST[cls]


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def generate(cls: Any, missing: object) -> Callable[[Any], Any]:
    """Compile the fast decoder of record class ``cls`` (a slotted dataclass).

    ``missing`` is the sentinel the careful decoder uses for absent fields.
    Nested record classes must have been generated before (they are declared
    before the records that hold them).
    """
    hints = typing.get_type_hints(cls)
    env: dict[str, Any] = {
        "Fallback": Fallback,
        "MISSING": missing,
        "BINARY": _BINARY,
        "Payload": Payload,
        "cls": cls,
    }
    gen = _Gen(env)
    lines = ["def fast(obj):", "    if type(obj) is not dict: raise Fallback", "    get = obj.get"]
    names = []
    fields = dataclasses.fields(cls)
    for i, f in enumerate(fields):
        check, _ = gen.check(hints[f.name], "v")
        lines.append(f"    v = get({f.name!r}, MISSING)")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            lines += ["    if v is MISSING: raise Fallback", *_indent(check)]
        else:
            default = default_expression(f, env, f"default_{i}")
            lines += ["    if v is MISSING or v is None:", f"        v = {default}"]
            if check:
                lines += ["    else:", *_indent(_indent(check))]
        lines.append(f"    field_{i} = v")
        names.append(f"field_{i}")
    if all(f.init for f in fields):
        lines.append(f"    return cls({', '.join(names)})")
    else:  # pragma: no cover - every record field is an __init__ argument today
        kwargs = ", ".join(f"{f.name}=field_{i}" for i, f in enumerate(fields) if f.init)
        lines.append(f"    return cls({kwargs})")
    exec("\n".join(lines), env)
    fast: Callable[[Any], Any] = env["fast"]
    _FAST[cls] = fast
    return fast
