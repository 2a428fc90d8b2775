"""The per-node circuit breaker (gateway/dimse/breaker.py), its settings, its place in the pool and
its HTTP mapping. No sockets: the clock is a variable and the connect function a fake."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from gateway.config import ConfigError, load_settings
from gateway.dimse import pool as pool_module
from gateway.dimse.breaker import CLOSED, DISABLED, HALF_OPEN, OPEN, CircuitBreaker, is_connection_failure
from gateway.dimse.errors import (
    AssociationRejected,
    BreakerOpen,
    ConnectionLost,
    DimseStatusError,
    DimseTimeout,
    NodeUnreachable,
    PoolExhausted,
    ServiceNotSupported,
)
from gateway.dimse.net import Peer
from gateway.dimse.pool import AssociationPool
from gateway.dimse.ul import Negotiated, Proposal
from gateway.problems import from_dimse
from gateway.status import not_ready_reasons


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker("pacs", threshold, cooldown, clock=clock), clock


def unreachable() -> NodeUnreachable:
    return NodeUnreachable("pacs", "cannot connect to the PACS: Connection refused")


# ------------------------------------------------------------------------------------------------
# The state machine


def test_closed_until_threshold_consecutive_failures() -> None:
    b, _ = breaker(threshold=3)
    for _ in range(2):
        assert b.before_attempt() is False
        b.record(unreachable())
    assert b.state == CLOSED and b.snapshot().consecutive_failures == 2
    assert b.before_attempt() is False
    b.record(unreachable())
    assert b.state == OPEN
    with pytest.raises(BreakerOpen) as info:
        b.before_attempt()
    assert info.value.node == "pacs" and info.value.retry_after == 10
    assert "3 consecutive connection failures" in info.value.message


def test_a_success_resets_the_count() -> None:
    b, _ = breaker(threshold=3)
    b.record(unreachable())
    b.record(unreachable())
    b.record_success()
    b.record(unreachable())
    b.record(unreachable())
    assert b.state == CLOSED and b.snapshot().consecutive_failures == 2


@pytest.mark.parametrize("exc", [
    NodeUnreachable("pacs", "refused"),
    ConnectionLost("pacs", "the PACS closed the connection during negotiation"),
    DimseTimeout("pacs", "no TCP connection within 5 s", phase="connect"),
    DimseTimeout("pacs", "no association response within 10 s", phase="acse"),
    AssociationRejected("pacs", "rejected-permanent", transient=False),
    ConnectionResetError(104, "Connection reset by peer"),
])
def test_connection_level_failures_count(exc: BaseException) -> None:
    assert is_connection_failure(exc) is True


@pytest.mark.parametrize("exc", [
    AssociationRejected("pacs", "rejected-transient", transient=True),
    ServiceNotSupported("pacs", "no context accepted"),
    DimseStatusError("pacs", "the PACS answered C-FIND with status 0xC000", status=0xC000),
    PoolExhausted("pacs", "all busy", retry_after=5),
])
def test_answers_from_the_pacs_are_not_failures(exc: BaseException) -> None:
    assert is_connection_failure(exc) is False
    b, _ = breaker(threshold=2)
    b.record(unreachable())
    b.record(exc)
    b.record(unreachable())
    assert b.state == CLOSED, "the PACS answered in between: the failures were not consecutive"


@pytest.mark.parametrize("exc", [
    BreakerOpen("pacs", "open", retry_after=3),
    DimseTimeout("pacs", "no C-FIND response within 30 s", phase="dimse"),
    RuntimeError("a bug"),
])
def test_inconclusive_outcomes_change_nothing(exc: BaseException) -> None:
    assert is_connection_failure(exc) is None
    b, _ = breaker(threshold=2)
    b.record(unreachable())
    b.record(exc)
    assert b.snapshot().consecutive_failures == 1 and b.state == CLOSED


def test_retry_after_counts_down_the_cooldown() -> None:
    b, clock = breaker(threshold=1, cooldown=10)
    b.record(unreachable())
    clock.now += 3.5
    with pytest.raises(BreakerOpen) as info:
        b.before_attempt()
    assert info.value.retry_after == 7
    assert b.snapshot().retry_after == 7
    clock.now += 6.4
    with pytest.raises(BreakerOpen) as info:
        b.before_attempt()
    assert info.value.retry_after == 1  # never 0


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    b, clock = breaker(threshold=2, cooldown=5)
    b.record(unreachable())
    b.record(unreachable())
    clock.now += 5
    assert b.state == HALF_OPEN and b.snapshot().retry_after is None
    assert b.before_attempt() is True  # the probe
    for _ in range(3):  # everyone else still fails fast while it runs
        with pytest.raises(BreakerOpen) as info:
            b.before_attempt()
        assert info.value.retry_after == 1
    assert b.state == HALF_OPEN
    b.record_success(probe=True)
    assert b.state == CLOSED and b.snapshot().consecutive_failures == 0
    assert b.before_attempt() is False


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    b, clock = breaker(threshold=2, cooldown=5)
    b.record(unreachable())
    b.record(unreachable())
    clock.now += 6
    assert b.before_attempt() is True
    b.record(unreachable(), probe=True)
    assert b.state == OPEN and b.snapshot().consecutive_failures == 3
    clock.now += 4.9
    with pytest.raises(BreakerOpen):
        b.before_attempt()
    clock.now += 0.1
    assert b.before_attempt() is True


def test_an_inconclusive_probe_frees_the_probe_slot() -> None:
    b, clock = breaker(threshold=1, cooldown=1)
    b.record(unreachable())
    clock.now += 1
    assert b.before_attempt() is True
    b.record(RuntimeError("cancelled, say"), probe=True)
    assert b.state == HALF_OPEN
    assert b.before_attempt() is True, "the next attempt probes instead"


def test_a_non_probe_failure_while_half_open_does_not_reopen() -> None:
    """An attempt that started before the breaker opened and fails late is counted, nothing more."""
    b, clock = breaker(threshold=1, cooldown=1)
    b.record(unreachable())
    clock.now += 1
    assert b.before_attempt() is True
    b.record(unreachable(), probe=False)
    assert b.state == HALF_OPEN
    with pytest.raises(BreakerOpen):
        b.before_attempt()  # the probe is still running


def test_threshold_zero_disables_it() -> None:
    b, _ = breaker(threshold=0)
    for _ in range(50):
        assert b.before_attempt() is False
        b.record(unreachable())
    assert b.state == DISABLED and b.snapshot().consecutive_failures == 50


# ------------------------------------------------------------------------------------------------
# HTTP


def test_breaker_open_is_a_503_with_retry_after() -> None:
    problem = from_dimse(BreakerOpen("pacs", "no association is attempted for 7 s", retry_after=7))
    assert problem.status == 503 and problem.error == "pacs-unavailable"
    assert problem.headers == {"Retry-After": "7"}
    assert "'pacs'" in problem.message


# ------------------------------------------------------------------------------------------------
# Settings

NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}


pytestmark = pytest.mark.usefixtures("auth_off")


def test_breaker_settings_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    node = load_settings(data={"nodes": [NODE]}).nodes[0]
    assert (node.breaker_threshold, node.breaker_cooldown) == (5, 10.0)
    node = load_settings(data={"nodes": [{**NODE, "breaker_threshold": 0, "breaker_cooldown": 0.5}]}).nodes[0]
    assert (node.breaker_threshold, node.breaker_cooldown) == (0, 0.5)
    monkeypatch.setenv("DWG_NODE_PACS_BREAKER_THRESHOLD", "2")
    monkeypatch.setenv("DWG_NODE_PACS_BREAKER_COOLDOWN", "30")
    node = load_settings(data={"nodes": [NODE]}).nodes[0]
    assert (node.breaker_threshold, node.breaker_cooldown) == (2, 30.0)


@pytest.mark.parametrize("key, value, problem", [
    ("breaker_threshold", -1, "between 0 (disabled) and 1000"),
    ("breaker_threshold", 1001, "between 0 (disabled) and 1000"),
    ("breaker_threshold", 2.5, "must be an integer"),
    ("breaker_cooldown", 0, "greater than 0"),
    ("breaker_cooldown", -3, "greater than 0"),
    ("breaker_cooldown", float("inf"), "finite"),
    ("breaker_cooldown", 3601, "at most 3600"),
])
def test_breaker_settings_are_validated(key: str, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data={"nodes": [{**NODE, key: value}]})
    assert info.value.setting == f"nodes[0].{key}"
    assert problem in info.value.problem


# ------------------------------------------------------------------------------------------------
# In the pool: checked before every new association, told how it went


class FakeAssociation:
    def __init__(self) -> None:
        self.negotiated = Negotiated(contexts=[], rejected=[], peer_max_pdu=16384)
        self.established = True
        self.released = False

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> object:
        return object()

    def idle_and_healthy(self) -> bool:
        return self.established

    def release(self) -> None:
        self.released = True
        self.established = False


def run_with_pool(monkeypatch: pytest.MonkeyPatch, outcomes: list[BaseException | None],
                  body: Any, threshold: int = 2, cooldown: float = 10.0) -> dict[str, Any]:
    """Run ``body(pool, clock)`` with ``connect`` replaced: each call takes the next outcome (an
    exception to raise, or None to open a fake association)."""
    calls: list[int] = []

    def fake_connect(peer: Peer, proposal: Proposal) -> FakeAssociation:
        calls.append(1)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return FakeAssociation()

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    clock = Clock()
    result: dict[str, Any] = {"calls": calls}

    async def main() -> None:
        peer = Peer(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, max_pdu=0, connect_timeout=1,
                    acse_timeout=1, dimse_timeout=1)
        async with anyio.create_task_group() as tg:
            pool = AssociationPool(peer, max_associations=2, acquire_timeout=1, idle_timeout=10,
                                   relational="negotiate", fuzzy=False, task_group=tg,
                                   breaker=CircuitBreaker("pacs", threshold, cooldown, clock=clock))
            result["pool"] = pool
            await body(pool, clock)
            await pool.aclose()

    anyio.run(main)
    return result


def test_pool_fails_fast_once_the_breaker_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(pool: AssociationPool, clock: Clock) -> None:
        for _ in range(2):
            with pytest.raises(NodeUnreachable):
                await pool.acquire()
        with pytest.raises(BreakerOpen):
            await pool.acquire()
        with pytest.raises(BreakerOpen):
            await pool.open_dedicated(Proposal(contexts=[]))
        assert pool.in_use == 0, "a refused attempt gives its slot back"

    out = run_with_pool(monkeypatch, [unreachable(), unreachable()], body)
    assert len(out["calls"]) == 2, "no connection attempted while the breaker is open"
    pool = out["pool"]
    assert pool.breaker.state == OPEN
    assert pool.last_error is not None and "Connection refused" in pool.last_error.message


def test_pool_probe_after_cooldown_closes_the_breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(pool: AssociationPool, clock: Clock) -> None:
        for _ in range(2):
            with pytest.raises(NodeUnreachable):
                await pool.open_dedicated(Proposal(contexts=[]))
        clock.now += 10
        with pytest.raises(NodeUnreachable):  # the probe, and it fails
            await pool.acquire()
        assert pool.breaker.state == OPEN
        clock.now += 10
        pooled = await pool.acquire()  # the next probe opens an association
        assert pool.breaker.state == CLOSED
        assert pool.last_capabilities is not None and pool.last_capabilities.peer_max_pdu == 16384
        await pool.release(pooled)

    out = run_with_pool(monkeypatch, [unreachable(), unreachable(), unreachable(), None], body)
    assert len(out["calls"]) == 4


def test_pool_status_failures_are_not_breaker_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(pool: AssociationPool, clock: Clock) -> None:
        for _ in range(4):
            with pytest.raises(AssociationRejected):
                await pool.acquire()
        assert pool.breaker.state == CLOSED

    transient = [AssociationRejected("pacs", "busy", transient=True) for _ in range(4)]
    run_with_pool(monkeypatch, transient, body)


# ------------------------------------------------------------------------------------------------
# /ready's conditions


def test_not_ready_reasons() -> None:
    settings = load_settings(data={"gateway": {"move_port": 11113},
                                   "nodes": [{**NODE, "retrieve": "move"}]})
    assert not_ready_reasons(None, None) == ["no configuration is loaded"]
    assert "not open" in not_ready_reasons(settings, None)[0]
    running = SimpleNamespace(running=True)
    stopped = SimpleNamespace(running=False)
    nodes: Any = SimpleNamespace(get=lambda name: object(), receiver=running)
    assert not_ready_reasons(settings, nodes) == []
    nodes.receiver = stopped
    assert "C-MOVE receiver is not running" in not_ready_reasons(settings, nodes)[0]
    nodes.receiver = None
    assert "C-MOVE receiver is not running" in not_ready_reasons(settings, nodes)[0]
    get_only = load_settings(data={"gateway": {"move_port": 11113}, "nodes": [NODE]})
    assert not_ready_reasons(get_only, nodes) == [], "no receiver wanted when every node uses C-GET"
    nodes.get = lambda name: None
    assert not_ready_reasons(get_only, nodes) == ["no pool for node 'pacs'"]
