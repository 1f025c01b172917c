"""Turning dask-style task graphs into Corral tasks.

Keys: the scheduler knows every key as a string.  String keys stay as they
are; other keys (dask's tuples such as ``("x", 0, 1)``) become their
``repr``.  The client keeps the original keys so results come back under them.

Tasks: each graph node becomes one task whose function is :func:`execute_node`
and whose argument is the node itself (dask's task-spec object, legacy tuple
tasks converted first), with a :class:`~corral.protocol.serialize.Ref` for
each dependency that the worker replaces by the dependency's value.
"""

from __future__ import annotations

import contextlib
import itertools
import typing
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from ..protocol.serialize import FunctionTable, Payload, Ref
from .ordering import in_forest_order


def stringify(key: Hashable) -> str:
    """The scheduler's name for a graph key."""
    return key if isinstance(key, str) else repr(key)


def flatten_keys(keys: Any) -> Iterator[Hashable]:
    """Every key in a nested list of keys (tuples are keys, lists are nesting)."""
    if isinstance(keys, list):
        for k in keys:
            yield from flatten_keys(k)
    else:
        yield keys


def pack_results(keys: Any, results: Mapping[Hashable, Any]) -> Any:
    """Arrange results in the nesting of ``keys``."""
    if isinstance(keys, list):
        return [pack_results(k, results) for k in keys]
    return results[keys]


def execute_node(node: Any, values: dict[Hashable, Any]) -> Any:
    """Run one dask graph node on a worker, given its dependencies' values."""
    return node(values)


#: One packed task: ``(key, args payload, dependency keys, priority)``.
PackedTask = tuple[str, Payload, list[str], int]


class ConvertedGraph:
    """A dask graph converted to task-spec nodes and ordered, ready to pack.

    :attr:`keys` lists the graph's keys highest priority first;
    :attr:`topological` says whether every key comes after its inputs in that
    order (``dask.order`` gives such an order), so that the graph may be sent
    in parts.  Aliases of a key to itself (a persisted collection pointing at
    its own futures) pack to no task.

    If ``annotations`` is given, it is filled with each task's ``dask.annotate``
    annotations (scheduler key -> {"resources": ..., "retries": ...}), also
    for tasks that dask's optimisation fused (see :func:`task_annotations`).
    """

    def __init__(self, dsk: Any, annotations: dict[str, dict[str, Any]] | None = None) -> None:
        from dask._task_spec import Alias, convert_legacy_graph

        source = dsk
        if hasattr(dsk, "__dask_graph__"):  # a dask expression, as dask.compute passes
            dsk = dsk.__dask_graph__()
        self.nodes: dict[Hashable, Any] = convert_legacy_graph(dict(dsk))
        self._alias = Alias
        self._names: dict[Hashable, str] = {}  # stringify(key), each key once
        dependencies = {k: set(getattr(n, "dependencies", ())) for k, n in self.nodes.items()}
        # Ordered after the conversion, with the dependencies already known:
        # dask.order would otherwise convert the graph and find them again.
        # Trees (every task feeds at most one) have a known best order.
        priorities: Mapping[Hashable, int] | None = in_forest_order(dependencies)
        if priorities is None:
            try:
                from dask.order import order

                priorities = typing.cast(
                    "dict[Hashable, int]", order(self.nodes, dependencies=dependencies)
                )
            except Exception:
                priorities = {}
        position = {k: priorities.get(k, i) for i, k in enumerate(self.nodes)}
        self.priorities = position
        self.keys: list[Hashable] = sorted(self.nodes, key=position.__getitem__)
        self.topological = all(
            position[d] < position[k]
            for k, deps in dependencies.items()
            for d in deps
            if d in position and d != k
        )
        if annotations is not None:
            annotations.update(task_annotations(source, self.nodes))

    def _is_self_alias(self, key: Hashable, node: Any) -> bool:
        return isinstance(node, self._alias) and stringify(node.target) == stringify(key)

    def pack(self, key: Hashable, table: FunctionTable) -> PackedTask | None:
        """The task for ``key``, its function pickled through ``table``; ``None`` for none."""
        from dask._task_spec import GraphNode

        node = self.nodes[key]
        if self._is_self_alias(key, node):
            return None
        if not isinstance(node, GraphNode):
            raise TypeError(f"graph value for {key!r} is not a task: {type(node).__name__}")
        node = _refs_for_futures(node)
        names = self._names
        deps = []
        dep_map = {}
        for dep in node.dependencies:
            name = names.get(dep)
            if name is None:
                name = names[dep] = stringify(dep)
            deps.append(name)
            dep_map[dep] = Ref(name)
        args, _ = table.dumps(((node, dep_map), {}))
        name = names.get(key)
        if name is None:
            name = names[key] = stringify(key)
        return name, args, deps, self.priorities[key]


#: Argument types that never hold a Future: most arguments, checked first.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _has_future(obj: Any, future_type: type) -> bool:
    kind = type(obj)
    if kind in _PLAIN:
        return False
    if kind is future_type:
        return True
    if kind in (list, tuple, set, frozenset):
        return any(_has_future(o, future_type) for o in obj)
    if kind is dict:
        return any(_has_future(v, future_type) for v in obj.values())
    return False


def _refs_for_futures(node: Any) -> Any:
    """Make futures given straight to a task (``delayed(f)(future)``) its dependencies.

    dask's ``Task`` only counts its own ``TaskRef`` class among its arguments as
    a dependency (``distributed.Future`` subclasses it), and leaves futures
    inside plain lists and dicts of arguments alone.
    """
    from dask._task_spec import Task, TaskRef, parse_input

    from .future import Future

    if type(node) is not Task:
        return node
    for a in itertools.chain(node.args, node.kwargs.values()):
        kind = type(a)
        # TaskRef: dask's reference to another key (our Future is not one).
        if kind is not TaskRef and kind not in _PLAIN and _has_future(a, Future):
            break
    else:
        return node

    def ref(a: Any) -> Any:
        if type(a) is Future:
            return TaskRef(a.key)
        # futures inside become aliases
        return parse_input(a) if _has_future(a, Future) else a

    return Task(
        node.key,
        node.func,
        *(ref(a) for a in node.args),
        _data_producer=node.data_producer,
        **{k: ref(v) for k, v in node.kwargs.items()},
    )


# ---------------------------------------------------------------------------
# Annotations (issue 3: worker resources)
# ---------------------------------------------------------------------------
# ``dask.annotate(resources=...)`` marks the layers of a HighLevelGraph.  By the
# time a graph reaches ``client.get`` dask has optimised it: blockwise and
# linear fusion merge tasks into one (keeping the last key) and the optimised
# graph's layers lose their annotations.  So annotations are read from the
# graphs *before* low-level optimisation (the ``hlg`` of every ``HLGExpr`` in
# the expression, or ``__dask_annotations__()``), and each optimised task
# collects the annotations of every original task fused into it: the original
# tasks it reaches through the original dependencies without passing another
# task of the optimised graph.  Fused annotations combine: ``resources`` take
# the largest demand of each resource, ``retries`` and ``priority`` the largest
# value, ``environment`` every environment named (issue 5), anything else the
# task's own value or else the first one found.

_MAX_MERGED = ("retries", "priority")


def _merge_annotation(into: dict[str, Any], found: Mapping[str, Any]) -> None:
    for name, value in found.items():
        if name not in into:
            is_demand = name == "resources" and isinstance(value, Mapping)
            into[name] = dict(value) if is_demand else value
        elif name == "resources" and isinstance(value, Mapping) and isinstance(into[name], dict):
            for r, amount in value.items():
                have = into[name].get(r)
                with contextlib.suppress(TypeError):  # not numbers: validation reports it
                    into[name][r] = amount if have is None else max(have, amount)
        elif name == "environment" and value and into[name]:
            have = [into[name]] if isinstance(into[name], str) else list(into[name])
            more = [value] if isinstance(value, str) else list(value)
            into[name] = list(dict.fromkeys([*have, *more]))
        elif name in _MAX_MERGED:
            with contextlib.suppress(TypeError):
                into[name] = max(into[name], value)


def _hlgs(source: Any) -> list[Any]:
    """The HighLevelGraphs (before low-level optimisation) inside ``source``."""
    try:
        from dask._expr import Expr, HLGExpr
        from dask.highlevelgraph import HighLevelGraph
    except ImportError:  # pragma: no cover - dask missing or too old
        return []
    if isinstance(source, HighLevelGraph):
        return [source]
    out = []
    if isinstance(source, Expr):
        for node in source.walk():
            if isinstance(node, HLGExpr):
                hlg = node.hlg
                if isinstance(hlg, HighLevelGraph):
                    out.append(hlg)
    return out


def raw_annotations(source: Any) -> tuple[dict[Hashable, dict[str, Any]], list[Any]]:
    """Annotations by original key, and the annotated HighLevelGraphs they came from."""
    by_key: dict[Hashable, dict[str, Any]] = {}
    hlgs = []
    for hlg in _hlgs(source):
        annotated = False
        for layer in hlg.layers.values():
            annots = getattr(layer, "annotations", None)
            if not annots:
                continue
            annotated = True
            for k in layer:
                entry = by_key.setdefault(k, {})
                for name, value in annots.items():
                    entry[name] = value(k) if callable(value) else value
        if annotated:
            hlgs.append(hlg)
    getter = getattr(source, "__dask_annotations__", None)
    if callable(getter):
        try:
            by_type = getter()
        except Exception:  # annotations are best effort, never fatal
            by_type = {}
        for name, per_key in (by_type or {}).items():
            for k, value in per_key.items():
                by_key.setdefault(k, {}).setdefault(name, value)
    return by_key, hlgs


def _inner_keys(node: Any, out: set[Hashable]) -> None:
    """Keys of the original tasks fused inside ``node`` (nested subgraphs too)."""
    try:
        from dask._task_spec import _execute_subgraph
    except ImportError:  # pragma: no cover - another dask
        return
    if getattr(node, "func", None) is not _execute_subgraph or not node.args:
        return
    inner = node.args[0]
    if isinstance(inner, Mapping):
        for k, v in inner.items():
            out.add(k)
            _inner_keys(v, out)


def task_annotations(source: Any, nodes: Mapping[Hashable, Any]) -> dict[str, dict[str, Any]]:
    """Each task's annotations (scheduler key -> annotations), fused tasks included.

    A task collects the annotations of its own key, of the original tasks fused
    inside it, and of every original task reached from those through the
    original dependencies without crossing one of its own inputs.  Aliases do
    no work and get none.
    """
    from dask._task_spec import Alias

    by_key, hlgs = raw_annotations(source)
    if not by_key:
        return {}
    raw_deps: dict[Hashable, Any] = {}
    for hlg in hlgs:
        # without them, fused tasks go unannotated
        with contextlib.suppress(Exception):
            raw_deps.update(hlg.get_all_dependencies())
    out: dict[str, dict[str, Any]] = {}
    for key, node in nodes.items():
        if isinstance(node, Alias):
            continue
        seeds: set[Hashable] = {key}
        _inner_keys(node, seeds)
        inputs = set(getattr(node, "dependencies", ()))
        merged: dict[str, Any] = {}
        stack = list(seeds)
        seen: set[Hashable] = set()
        while stack:
            k = stack.pop()
            if k in seen or (k in inputs and k not in seeds):
                continue
            seen.add(k)
            found = by_key.get(k)
            if found:
                _merge_annotation(merged, found)
            stack.extend(raw_deps.get(k, ()))
        if merged:
            out[stringify(key)] = merged
    return out
