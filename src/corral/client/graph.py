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

from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from ..protocol.serialize import FunctionTable, Payload, Ref


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


def graph_to_tasks(
    dsk: Any, table: FunctionTable | None = None
) -> tuple[list[tuple[str, Payload, list[str], int]], set[str]]:
    """Convert a dask graph into ``(key, args payload, dependency keys, order)`` tuples.

    Also returns the keys the graph refers to but does not define (existing
    futures).  Aliases of a key to itself (a persisted collection pointing at
    its own futures) produce no task.  Functions that must travel by value
    (defined in ``__main__``, lambdas) are pickled once into ``table``.
    """
    table = table if table is not None else FunctionTable()
    from dask._task_spec import Alias, GraphNode, convert_legacy_graph

    if hasattr(dsk, "__dask_graph__"):  # a dask expression, as dask.compute passes
        dsk = dsk.__dask_graph__()
    try:
        from dask.order import order

        priorities = order(dsk) if len(dsk) > 1 else {}
    except Exception:
        priorities = {}
    nodes = convert_legacy_graph(dict(dsk))
    tasks = []
    defined = {stringify(k) for k in nodes}
    external: set[str] = set()
    for i, (key, node) in enumerate(nodes.items()):
        skey = stringify(key)
        if isinstance(node, Alias) and stringify(node.target) == skey:
            defined.discard(skey)
            external.add(skey)
            continue
        if not isinstance(node, GraphNode):
            raise TypeError(f"graph value for {key!r} is not a task: {type(node).__name__}")
        dep_map = {dep: Ref(stringify(dep)) for dep in node.dependencies}
        args, _ = table.dumps(((node, dep_map), {}))
        tasks.append((skey, args, [stringify(d) for d in node.dependencies], priorities.get(key, i)))
    for _, _, deps, _ in tasks:
        for d in deps:
            if d not in defined:
                external.add(d)
    return tasks, external
