"""The worker-to-supervisor channel for nanny plugins (corral.nanny_channel), in one process."""

from __future__ import annotations

import asyncio

from corral import NannyPlugin
from corral.nanny import Slot, child_info
from corral.nanny_channel import CHANNEL_ENV, WorkerEnd, request
from corral.protocol.serialize import serialize


class Counting(NannyPlugin):
    name = "counting"
    restart = True

    def setup(self, nanny):
        nanny.env["SETUPS"] = str(int(nanny.env.get("SETUPS", "0")) + 1)

    def teardown(self, nanny):
        raise RuntimeError("teardown-broke")


def ask(slot, req):
    """Send ``req`` as the worker does while the supervisor's loop serves it."""

    async def main():
        answer = asyncio.ensure_future(WorkerEnd(slot.env[CHANNEL_ENV]).ask(req, timeout=10))
        while not answer.done():
            slot.serve_plugins()
            await asyncio.sleep(0.01)
        return answer.result()

    return asyncio.run(main())


def test_a_registration_is_set_up_once_and_asks_for_one_restart():
    slot = Slot(["true"], env={})
    try:
        payload = serialize(Counting())
        first = ask(slot, request("setup", "counting", payload, registration="r1"))
        assert first.error is None and first.restart
        again = ask(slot, request("setup", "counting", payload, registration="r1"))
        assert again.error is None and not again.restart  # the restarted worker joining
        assert slot.env["SETUPS"] == "1" and list(slot.plugins) == ["counting"]
    finally:
        slot.cleanup()


def test_teardown_errors_come_back_with_the_plugins_frame():
    slot = Slot(["true"], env={})
    try:
        ask(slot, request("setup", "counting", serialize(Counting()), registration="r1"))
        answer = ask(slot, request("teardown", "counting"))
        assert answer.error is not None and answer.error.message == "teardown-broke"
        assert "in teardown" in answer.error.traceback_text
        assert "corral/nanny_channel.py" not in answer.error.traceback_text
        assert slot.plugins == {}
    finally:
        slot.cleanup()


def test_the_child_reads_the_channel_from_its_environment():
    slot = Slot(["true"], env={})
    try:
        env = dict(slot.env)
        info = child_info(env)
        assert info is not None and info.channel == slot.env[CHANNEL_ENV]
        assert CHANNEL_ENV not in env  # not passed on to the worker's tasks
    finally:
        slot.cleanup()
