"""The supervisor's decisions (corral.nanny), without processes."""

from __future__ import annotations

import os

import pytest

from corral.nanny import (
    EXIT_REFUSED,
    EXIT_RESTART,
    PARENT_ENV,
    READY_ENV,
    SLOT_ENV,
    Slot,
    child_info,
)


@pytest.fixture
def slot():
    s = Slot(["true"], env={}, label="w")
    s.starts = 1
    yield s
    s.cleanup()


def ready(s, yes=True):
    if yes:
        open(s.ready_file, "w").close()
    elif os.path.exists(s.ready_file):
        os.unlink(s.ready_file)


def test_children_get_their_slot_ready_file_and_parent(slot):
    assert slot.env[SLOT_ENV] == slot.id
    assert slot.env[READY_ENV] == slot.ready_file
    assert slot.env[PARENT_ENV] == str(os.getpid())


def test_a_requested_restart_starts_again_at_once(slot):
    ready(slot)
    assert slot.exited(EXIT_RESTART) == "restart"
    assert slot.due() and slot.outcome is None


def test_a_crash_after_connecting_restarts_with_a_growing_delay(slot):
    ready(slot)
    delays = []
    for _ in range(4):  # each crash right after its start
        assert slot.exited(-9) == "restart"
        delays.append(slot.restart_at - slot.started)
        slot.starts += 1
    assert delays == sorted(delays) and delays[-1] > delays[0]


def test_clean_exits_refusals_and_startup_failures_are_final(slot):
    ready(slot)
    assert slot.exited(0) == "done" and slot.outcome == 0
    slot.outcome = None
    assert slot.exited(EXIT_REFUSED) == "failed" and slot.outcome == EXIT_REFUSED
    slot.outcome = None
    ready(slot, False)
    assert slot.exited(1) == "failed"  # never connected (a bad preload): restarting won't help


def test_a_restarted_child_failing_to_start_is_retried_a_few_times(slot):
    slot.starts = 2
    ready(slot, False)
    results = [slot.exited(1) for _ in range(5)]
    assert results[:4] == ["restart"] * 4 and results[4] == "failed"


def test_child_info_reads_and_clears_the_environment():
    env = {SLOT_ENV: "abc", READY_ENV: "/tmp/r", PARENT_ENV: "123", "OTHER": "x"}
    info = child_info(env)
    assert (info.slot, info.ready_file, info.parent) == ("abc", "/tmp/r", 123)
    assert env == {"OTHER": "x"}  # tasks and their subprocesses do not inherit it
    assert child_info({}) is None
