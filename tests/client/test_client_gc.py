"""corral._gc.paused_gc: the collector is off while a map or graph is packed, then back."""

from __future__ import annotations

import gc

import pytest

from corral import Client
from corral._gc import paused_gc


@pytest.fixture(autouse=True)
def _collector_enabled():
    gc.enable()
    yield
    gc.enable()


def test_paused_inside_and_enabled_after() -> None:
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():  # nested: the inner one leaves it to the outer
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_enabled_again_after_an_error() -> None:
    with pytest.raises(ZeroDivisionError), paused_gc():
        1 / 0  # noqa: B018
    assert gc.isenabled()


def test_a_user_who_disabled_it_keeps_it_disabled() -> None:
    gc.disable()
    with paused_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_map_and_get_leave_the_collector_as_they_found_it(client: Client) -> None:
    assert client.gather(client.map(abs, range(-50, 0))) == list(range(50, 0, -1))
    assert client.get({"a": (abs, -1), "b": (abs, "a")}, "b") == 1
    assert gc.isenabled()
    gc.disable()
    client.gather(client.map(abs, range(-5, 0)))
    assert not gc.isenabled()  # not turned on behind the user's back
