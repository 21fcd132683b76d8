"""serve_app/availability.py: a lost replica makes the model probe; no answer -> down (refuse
at once) until a probe answers. Fake probes, no Ray."""

import asyncio

import pytest

from serve_app.availability import Availability


class Probe:
    """Answers while ``up``; hangs (as Ray's router does with no replica) otherwise."""

    def __init__(self, up: bool):
        self.up = up
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if not self.up:
            await asyncio.sleep(3600)
        return True


def test_a_surviving_replica_answers_the_probe_and_nothing_goes_down():
    async def scenario():
        probe, downs = Probe(up=True), []
        a = Availability("m", probe, timeout_s=0.05, interval_s=0.01, on_down=lambda: downs.append(1))
        a.lost()
        await asyncio.sleep(0.1)
        return a, probe, downs

    a, probe, downs = asyncio.run(scenario())
    assert not a.down and probe.calls == 1 and downs == [] and a.losses == 1


def test_no_answer_is_down_until_a_replica_answers():
    async def scenario():
        probe, downs = Probe(up=False), []
        a = Availability("m", probe, timeout_s=0.05, interval_s=0.01, on_down=lambda: downs.append(1))
        a.lost()
        a.lost()  # a second loss while probing starts no second watcher
        await asyncio.sleep(0.2)
        down_then, calls_then = a.down, probe.calls
        probe.up = True
        await asyncio.sleep(0.1)
        return a, down_then, calls_then, downs

    a, down_then, calls_then, downs = asyncio.run(scenario())
    assert down_then and calls_then >= 2  # it kept asking
    assert downs == [1]  # told once, however many probes failed
    assert not a.down and a.down_since is None and a.losses == 2


def test_a_probe_that_raises_counts_as_no_answer():
    async def failing():
        raise RuntimeError("no replica")

    async def scenario():
        a = Availability("m", failing, timeout_s=1.0, interval_s=0.01)
        a.lost()
        await asyncio.sleep(0.05)
        return a.down

    assert asyncio.run(scenario())


def test_settings_must_be_positive():
    with pytest.raises(ValueError):
        Availability("m", Probe(True), timeout_s=0, interval_s=1)


def test_slow_calls_probe_at_most_once_per_interval_but_a_loss_always_probes():
    async def scenario():
        probe, downs = Probe(up=True), []
        a = Availability("m", probe, timeout_s=0.05, interval_s=0.3,
                         on_down=lambda: downs.append(1))
        a.check()  # nothing answered here yet: a slow first call is no reason to probe
        await asyncio.sleep(0.02)
        assert probe.calls == 0
        a.answered()
        a.check()
        await asyncio.sleep(0.02)
        for _ in range(5):  # slow calls right after an answered probe: no new probe
            a.check()
            await asyncio.sleep(0.01)
        after_checks = probe.calls
        a.lost()  # a lost replica is always looked into
        await asyncio.sleep(0.02)
        after_loss = probe.calls
        await asyncio.sleep(0.3)
        a.check()  # the interval has passed
        await asyncio.sleep(0.02)
        return after_checks, after_loss, probe.calls, a.down, downs

    after_checks, after_loss, calls, down, downs = asyncio.run(scenario())
    assert (after_checks, after_loss, calls) == (1, 2, 3)
    assert not down and downs == [] and calls == 3


def test_while_the_controller_counts_running_replicas_a_failed_probe_only_waits():
    """A probe that fails while the controller still counts running replicas (a rollout, a
    dead replica not yet counted out) refuses nothing; the probe repeats, and once the
    controller counts none the model goes down."""
    async def scenario():
        probe, downs, running = Probe(up=False), [], {"n": 1}

        async def none_running():
            return running["n"] == 0

        a = Availability("m", probe, timeout_s=0.02, interval_s=0.01,
                         on_down=lambda: downs.append(1), none_running=none_running)
        a.lost()
        await asyncio.sleep(0.15)
        waited = (a.down, probe.calls)
        running["n"] = 0
        await asyncio.sleep(0.1)
        return waited, a.down, downs

    (down_while_running, calls), down_after, downs = asyncio.run(scenario())
    assert not down_while_running and calls >= 3  # it kept asking, refusing nothing
    assert down_after and downs == [1]


def test_a_controller_that_cannot_answer_refuses_nothing():
    async def scenario():
        async def broken():
            raise RuntimeError("controller unreachable")

        a = Availability("m", Probe(up=False), timeout_s=0.02, interval_s=0.01,
                         none_running=broken)
        a.lost()
        await asyncio.sleep(0.1)
        return a.down

    assert not asyncio.run(scenario())
