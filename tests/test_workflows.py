"""Workflows: chain, group, chord, tracked by the broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import zq
from tests import tasks
from tests.conftest import wait_for_workers

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def worker(start_worker):
    return start_worker(pool="thread", concurrency=4)


def test_chain_passes_each_result_on(app, worker):
    res = zq.chain(tasks.add.s(1, 2), tasks.mul.s(10), tasks.add.s(5)).apply_async()
    assert res.get(timeout=15) == 35
    assert (tasks.add.s(1, 1) | tasks.mul.s(3)).delay().get(timeout=15) == 6


def test_immutable_signature_ignores_the_previous_result(app, worker):
    assert (tasks.add.s(1, 1) | tasks.add.si(10, 20)).apply_async().get(timeout=15) == 30


def test_a_failing_step_stops_the_chain(app, worker, tmp_path):
    marker = tmp_path / "ran"
    res = zq.chain(
        tasks.add.s(1, 1), tasks.fail_with.s("boom"), tasks.touch.s(str(marker))
    ).apply_async()
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=15)
    assert info.value.exc_type == "ValueError" and info.value.exc_message == "boom"
    assert res.status == "FAILURE"
    assert not marker.exists(), "the step after the failure did not run"


def test_group_returns_results_in_order(app, worker):
    result = zq.group(tasks.add.s(i, i) for i in range(10)).apply_async()
    assert isinstance(result, zq.GroupResult) and len(result) == 10
    assert result.get(timeout=15) == [2 * i for i in range(10)]
    assert result.successful() and result.completed_count() == 10


def test_empty_group(app):
    assert zq.group().apply_async().get(timeout=1) == []
    assert zq.group([]).apply_async().get(timeout=1) == []


def test_chord_gets_the_list_of_results(app, worker):
    res = zq.chord((tasks.mul.s(i, 2) for i in range(5)), tasks.total.s(offset=100)).apply_async()
    assert res.get(timeout=15) == 120


def test_one_member_chord(app, worker):
    assert zq.chord([tasks.add.s(2, 3)], tasks.total.s()).apply_async().get(timeout=15) == 5


def test_chord_over_an_empty_group_runs_the_callback_with_nothing(app, worker):
    assert zq.chord([], tasks.total.s(offset=7)).apply_async().get(timeout=15) == 7


def test_a_failing_chord_member_stops_the_callback(app, worker, tmp_path):
    marker = tmp_path / "ran"
    members = [tasks.add.s(1, 1), tasks.fail.s("member failed"), tasks.add.s(2, 2)]
    res = zq.chord(members, tasks.touch.s(str(marker))).apply_async()
    with pytest.raises(zq.TaskFailed) as info:
        res.get(timeout=15)
    assert info.value.exc_message == "member failed"
    assert not marker.exists()


def test_nested_chains_in_a_group_and_in_a_chord(app, worker):
    inner = zq.group(
        tasks.add.s(1, 1) | tasks.mul.s(10),
        zq.chain(tasks.add.s(2, 2), tasks.mul.s(10), tasks.add.s(1)),
        tasks.add.s(0, 3),
    )
    assert inner.apply_async().get(timeout=15) == [20, 41, 3]
    assert zq.chord(inner, tasks.total.s()).apply_async().get(timeout=15) == 64
    # A group in the middle of a chain: each member gets the result before it.
    res = (tasks.add.s(1, 2) | zq.group(tasks.mul.s(2), tasks.mul.s(3)) | tasks.total.s()).delay()
    assert res.get(timeout=15) == 15


def test_step_options_and_countdown(app, worker):
    res = (tasks.stamp.si("first") | tasks.stamp.si("second").set(countdown=1.0)).apply_async()
    second = res.get(timeout=15)
    assert second[0] == "second"


def test_a_keyed_step_that_takes_a_result_needs_a_key(app, tmp_path):
    with pytest.raises(ValueError, match="set\\(key="):
        (tasks.add.s(1, 1) | tasks.keyed.s(1, 0.0, str(tmp_path))).apply_async()
    with pytest.raises(ValueError, match="unknown signature option"):
        tasks.add.s(1, 1).set(colour="red")


def test_a_chord_too_wide_for_one_header_is_refused_in_the_caller(app):
    from zq.workflow import MAX_PARENTS

    members = [tasks.add.s(i, i) for i in range(MAX_PARENTS + 1)]
    with pytest.raises(ValueError, match="at most"):
        zq.chord(members, tasks.total.s()).apply_async()


def test_a_workflow_completes_after_its_client_exits(app, broker, worker):
    script = textwrap.dedent(
        f"""
        import zq
        from tests import tasks
        tasks.app.broker = {broker.endpoint!r}
        res = zq.chain(tasks.sleep.s(0.5), tasks.add.s(1), tasks.mul.s(2)).apply_async()
        print(res.id, flush=True)
        tasks.app.close()  # waits only until the broker accepted the steps
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    last = out.stdout.split()[-1]
    assert app.AsyncResult(last).get(timeout=15) == 3.0


def test_a_workflow_survives_a_broker_restart(app, broker, start_worker):
    res = zq.chain(tasks.add.s(1, 1), tasks.sleep.s(), tasks.add.s(10)).apply_async()
    first = start_worker(pool="thread", concurrency=1)
    # Let the chain get going, then take the broker down while the sleep step runs.
    zq.testing.wait_for(lambda: app.status()["counters"].get("done", 0) >= 1, 15, "step 1")
    broker.kill()
    first.close()
    broker.restart()
    second = start_worker(pool="thread", concurrency=1, wait=False)
    wait_for_workers(broker.endpoint, lambda pids: second.pid in pids)
    assert res.get(timeout=30) == 12


def test_a_wide_chord_fits_its_submits(app, worker):
    """A callback waiting for the widest allowed group: the client splits the SUBMITs
    so that no SUBMIT header passes the broker's header limit."""
    from zq.workflow import MAX_PARENTS

    members = [tasks.add.s(i, 0) for i in range(MAX_PARENTS)]
    res = zq.chord(members, tasks.total.s()).apply_async()
    assert res.get(timeout=60) == sum(range(MAX_PARENTS))


def test_graph_ignores_a_parent_for_a_reused_id():
    """An id used again (its old result expired) must not be failed by a parent the
    old task waited for and the new one does not."""
    from zq.workflow import Graph

    graph = Graph()
    graph.add("child", "old", ["failing-parent"])
    graph.remove("child")  # e.g. revoked; its result later expires
    graph.add("child", "new", ["other-parent"])
    assert graph.finished("failing-parent", ok=False) == ([], [])
    assert graph.finished("other-parent", ok=True) == (["new"], [])
