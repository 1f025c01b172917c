"""Priorities for tree-shaped graphs (corral.client.ordering), checked against dask.order."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from dask.order import order as dask_order
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import Client
from corral.client.graph import ConvertedGraph
from corral.client.ordering import in_forest_order


def peak_results(priorities: Mapping[Any, int], deps: Mapping[Any, list[Any]]) -> int:
    """Most results held at once when the tasks run one at a time in priority order.

    A result is held from the moment its task runs until its (only) consumer
    has run; results nobody consumes (outputs) are held to the end.
    """
    consumer = {d: k for k, ds in deps.items() for d in ds}
    held = peak = 0
    for key in sorted(deps, key=priorities.__getitem__):
        held += 1  # the result being made, next to its inputs
        peak = max(peak, held)
        held -= len(deps[key])  # its inputs are freed
    assert held == sum(1 for k in deps if k not in consumer)
    return peak


@st.composite
def forests(draw: st.DrawFn) -> dict[Hashable, list[Hashable]]:
    """A random forest of in-trees: each task feeds at most one later task."""
    n = draw(st.integers(1, 60))
    deps: dict[Hashable, list[Hashable]] = {("t", i): [] for i in range(n)}
    for i in range(n):
        # task i feeds some later task, or nothing (it is an output)
        if i < n - 1 and draw(st.booleans()):
            deps[("t", draw(st.integers(i + 1, n - 1)))].append(("t", i))
    keys = list(deps)
    order = draw(st.permutations(keys))  # the graph's own key order is arbitrary
    return {k: deps[k] for k in order}


@settings(max_examples=300, deadline=None)
@given(forests())
def test_forest_order_is_topological_complete_and_never_needs_more_memory_than_dask(
    deps: dict[Hashable, list[Hashable]],
) -> None:
    ours = in_forest_order(deps)
    assert ours is not None
    assert sorted(ours.values()) == list(range(len(deps)))
    for key, inputs in deps.items():
        assert all(ours[d] < ours[key] for d in inputs)
    graph: Any = deps  # dask's annotations want its own key type
    theirs = dask_order(graph, dependencies={k: set(v) for k, v in graph.items()})
    assert peak_results(ours, deps) <= peak_results(theirs, deps)


def test_a_task_feeding_two_others_is_not_a_forest() -> None:
    assert in_forest_order({"a": [], "b": ["a"], "c": ["a"]}) is None


def test_a_cycle_is_not_a_forest() -> None:
    assert in_forest_order({"a": ["b"], "b": ["a"]}) is None
    assert in_forest_order({"a": ["b"], "b": ["a"], "c": []}) is None


def test_outside_keys_and_self_references_are_ignored() -> None:
    assert in_forest_order({"a": ["future-x"], "b": ["a", "b"]}) == {"a": 0, "b": 1}


def test_a_deep_chain_needs_no_recursion() -> None:
    n = 50_000
    deps = {i: ([i - 1] if i else []) for i in range(n)}
    assert in_forest_order(deps) == {i: i for i in range(n)}


def test_the_bigger_subtree_goes_first() -> None:
    # c needs 3 results at once (a chain of pairs), d only 1: c's side runs first.
    deps: dict[str, list[str]] = {"d": [], "a1": [], "a2": [], "a": ["a1", "a2"], "b": []}
    deps.update({"c": ["a", "b"], "r": ["d", "c"]})
    ours = in_forest_order(deps)
    assert ours is not None
    assert ours["c"] < ours["d"]


def test_trees_skip_dask_order_and_graphs_with_shared_inputs_use_it() -> None:
    tree: dict[Any, Any] = {("leaf", i): (sum, [i]) for i in range(8)}
    tree.update({("add", i): (sum, [("leaf", 2 * i), ("leaf", 2 * i + 1)]) for i in range(4)})
    tree["total"] = (sum, [("add", i) for i in range(4)])
    graph = ConvertedGraph(tree)
    assert graph.keys[-1] == "total" and graph.topological
    shared: dict[Any, Any] = {"x": (sum, [1]), "a": (sum, ["x"]), "b": (sum, ["x"])}
    shared["out"] = (sum, ["a", "b"])
    graph = ConvertedGraph(shared)
    assert graph.keys[0] == "x" and graph.keys[-1] == "out" and graph.topological


def test_a_tree_reduction_runs_right(client: Client) -> None:
    leaves = 256
    graph: dict[Hashable, object] = {("leaf", i): (abs, -i) for i in range(leaves)}
    level = 0
    keys: list[Any] = [("leaf", i) for i in range(leaves)]
    while len(keys) > 1:
        level += 1
        nxt: list[Any] = []
        for j in range(len(keys) // 2):
            graph[("add", level, j)] = (sum, [keys[2 * j], keys[2 * j + 1]])
            nxt.append(("add", level, j))
        keys = nxt
    assert client.get(graph, keys[0]) == sum(range(leaves))
