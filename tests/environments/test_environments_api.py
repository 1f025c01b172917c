"""The WorkerEnvironment model without a cluster: names, the functional style, hook calls."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import WorkerEnvironment, get_environment_state
from corral.environments import as_environment, call_hook


class FakeWorker:
    address = "tcp://127.0.0.1:1"
    name = "fake"

    def __init__(self):
        self.environment_state = {"db": {"conn": 1}}


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(
    "hook",
    [
        lambda worker: worker,
        lambda dask_worker: dask_worker,
        lambda corral_worker: corral_worker,
        lambda w: w,
        lambda *args: args[0],
        lambda *, worker: worker,
        lambda x=None, worker=None: worker,
    ],
    ids=["worker", "dask_worker", "corral_worker", "positional", "varargs", "kwonly", "named"],
)
def test_hooks_get_the_worker_when_they_take_it(hook):
    worker = FakeWorker()
    assert run(call_hook(hook, worker)) is worker


def test_hooks_without_parameters_reach_the_worker_through_get_worker():
    worker = FakeWorker()

    def no_args():
        return corral.get_worker(), get_environment_state("db")

    async def coroutine():
        await asyncio.sleep(0)
        return corral.get_worker()

    assert run(call_hook(no_args, worker)) == (worker, {"conn": 1})
    assert run(call_hook(coroutine, worker)) is worker
    assert run(call_hook(lambda x=3: x, worker)) == 3  # an optional parameter is left alone
    with pytest.raises(ValueError, match="outside a task"):
        get_environment_state("db")


def test_a_worker_that_is_not_a_member_is_told_which_environment():
    def read():
        return get_environment_state("gpu-box")

    with pytest.raises(KeyError, match="not a member of the environment 'gpu-box'") as info:
        run(call_hook(read, FakeWorker()))
    assert isinstance(info.value, corral.environments.NotAMemberError)
    assert "tcp://127.0.0.1:1" in str(info.value) and "['db']" in str(info.value)


def test_the_functional_style_attaches_the_functions():
    def condition():
        return False

    env = as_environment(name="x", condition=condition)
    assert type(env) is WorkerEnvironment and env.name == "x"
    assert env.condition is condition
    assert run(call_hook(env.setup, FakeWorker())) is None  # the default setup does nothing
    assert run(call_hook(WorkerEnvironment().condition, FakeWorker())) is True


def test_classes_instances_and_names():
    class Named(WorkerEnvironment):
        name = "named"

    assert as_environment(Named).name == "named"
    assert as_environment(Named(), name="renamed").name == "renamed"
    assert as_environment(WorkerEnvironment("given")).name == "given"
    for bad, error in [(None, ValueError), ("", ValueError), (b"x", TypeError), (1, TypeError)]:
        with pytest.raises(error):
            as_environment(name=bad)
    with pytest.raises(TypeError, match="must be callable"):
        WorkerEnvironment("x", setup=3)
    with pytest.raises(TypeError, match="instance"):
        as_environment(object())
