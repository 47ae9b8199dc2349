"""Results survive a lost PUB message: the broker keeps them and get() falls back to FETCH."""

from __future__ import annotations

import gc

import pytest
import zmq

import zq
from tests import tasks
from zq import protocol as p
from zq.testing import WorkerProcess, wait_for


def _recv(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(timeout * 1000), "no reply from the broker"
    return sock.recv_multipart()


def test_a_client_without_any_subscription_fetches_its_result(broker, start_worker):
    """Raw DEALER, no SUB at all: every PUB message for it is lost, FETCH still answers."""
    start_worker()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    try:
        task = {"id": "raw-1", "name": "tests.tasks.add", "queue": "default"}
        sock.send_multipart(
            p.message(
                p.CLIENT, p.SUBMIT, {"client": "ab", "tasks": [task]}, p.encode([[20, 22], {}])
            )
        )
        _, command, header = _recv(sock)[:3]
        assert command == p.ACCEPTED and p.unpack_header(header)["ids"] == ["raw-1"]
        # A FETCH that waits: answered when the task ends.
        sock.send_multipart(p.message(p.CLIENT, p.FETCH, {"ids": ["raw-1"], "wait": 10}))
        _, command, header, payload = _recv(sock, 10)
        assert command == p.RESULT
        assert p.unpack_header(header)["state"] == "SUCCESS"
        assert p.decode(payload) == 42
    finally:
        sock.close()


def test_get_works_when_the_published_result_was_dropped(app, start_worker):
    """The client drops PUB results nobody here waits for; a later get() by id
    still returns, fetched from the broker's result store."""
    start_worker()
    res = tasks.add.delay(5, 6)
    task_id = res.id
    del res
    gc.collect()
    other = zq.App("observer", broker=app.broker)
    try:
        wait_for(lambda: other.AsyncResult(task_id).status == "SUCCESS", 10, "task done")
    finally:
        other.close()
    late = app.AsyncResult(task_id)
    assert not late.ready_here()  # the PUB message was not kept in this process
    assert late.get(timeout=5) == 11


def test_ignore_result_keeps_nothing(app, start_worker):
    start_worker()

    res = app.send_task("tests.tasks.add", [1, 2], ignore_result=True)
    probe = tasks.add.delay(0, 0)
    assert probe.get(timeout=10) == 0
    try:
        res.get(timeout=1)
    except zq.ResultUnavailable:
        pass
    else:
        raise AssertionError("get() on an ignore_result task must raise ResultUnavailable")


def test_a_process_can_follow_one_task_while_the_others_come_in_batches(app, broker, start_worker):
    """A client gets a loop turn's results as one RESULTS message; a SUB subscribed to
    one task's topic (client id + task id) still gets that task's result, alone."""
    start_worker(concurrency=4, pool="thread")
    status = app.status()  # also starts the client, whose id the topic begins with
    seen = status["counters"].get("subscriptions", 0)
    topic = (app.client.id + "followed-task").encode()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.pub_endpoint)
    sub.subscribe(topic)
    everything = ctx.socket(zmq.SUB)  # what the client itself gets: all under its id
    everything.linger = 0
    everything.connect(broker.pub_endpoint)
    everything.subscribe(app.client.id.encode())
    try:
        wait_for(
            lambda: app.status()["counters"].get("subscriptions", 0) > seen + 1,
            10,
            "the subscriptions",
        )
        before = [tasks.add.delay(i, i) for i in range(300)]
        followed = tasks.add.apply_async(args=(20, 22), task_id="followed-task")
        after = [tasks.add.delay(i, 1) for i in range(300)]
        assert [r.get(timeout=30) for r in before] == [2 * i for i in range(300)]
        assert [r.get(timeout=30) for r in after] == [i + 1 for i in range(300)]
        assert followed.get(timeout=10) == 42
        frames = _recv(sub)
        assert frames[0] == topic and frames[1] == p.RESULT
        assert p.unpack_header(frames[2])["id"] == "followed-task"
        assert p.decode(frames[3]) == 42
        ids, batches = [], 0
        while len(ids) < 601:
            frames = _recv(everything)
            if frames[1] == p.RESULTS:
                results = p.unpack_header(frames[2])["results"]
                assert len(results) == len(frames) - 3 > 1
                batches += 1
                ids += [r["id"] for r in results]
            else:
                assert frames[1] == p.RESULT
                ids.append(p.unpack_header(frames[2])["id"])
        assert sorted(ids) == sorted(r.id for r in [*before, followed, *after])
        assert batches, "no loop turn had two results for the client"
    finally:
        sub.close()
        everything.close()


def test_a_subscription_to_a_prefix_of_task_ids_gets_those_results(app, broker, start_worker):
    """Tasks whose ids share a prefix can be followed together: those results go alone
    under their own topics, not in the client's batch."""
    start_worker(concurrency=4, pool="thread")
    seen = app.status()["counters"].get("subscriptions", 0)
    prefix = (app.client.id + "grp-").encode()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.pub_endpoint)
    sub.subscribe(prefix)
    try:
        wait_for(
            lambda: app.status()["counters"].get("subscriptions", 0) > seen, 10, "the subscription"
        )
        results = [
            tasks.add.apply_async(args=(i, 0), task_id=f"{'grp' if i % 2 else 'other'}-{i}")
            for i in range(200)
        ]
        assert [r.get(timeout=30) for r in results] == list(range(200))
        got = set()
        while len(got) < 100:
            frames = _recv(sub)
            assert frames[0].startswith(prefix) and frames[1] == p.RESULT
            got.add(p.unpack_header(frames[2])["id"])
        assert got == {f"grp-{i}" for i in range(1, 200, 2)}
    finally:
        sub.close()


def test_past_the_subscription_cap_every_result_goes_alone(monkeypatch):
    """Once more topics are subscribed than the broker follows, it cannot tell which
    task a late subscription is for: it stops batching, so no follower misses one.
    (An embedded broker, to lower the cap to 3 topics.)"""
    from zq import broker as broker_module
    from zq import outbox

    monkeypatch.setattr(outbox, "MAX_SUBSCRIPTIONS", 3)
    embedded = broker_module.Broker(
        broker_module.BrokerSettings(bind="tcp://127.0.0.1:*", journal=":memory:")
    ).start()
    app = zq.App("tests", broker=embedded.endpoint)
    ctx = zmq.Context.instance()
    subs = []
    try:
        worker = WorkerProcess("tests.tasks", embedded.endpoint, concurrency=2, pool="thread")
        subs.append(worker)
        app.status()  # the client's own id is the first topic subscribed
        topics = [b"filler-1", b"filler-2", (app.client.id + "late").encode()]
        for count, topic in enumerate(topics, 2):  # in this order: "late" is the 4th
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.connect(embedded.pub_endpoint)
            sub.subscribe(topic)
            subs.append(sub)
            wait_for(lambda n=count: embedded.counters["subscriptions"] >= n, 10, "subscribed")
        followed = embedded.outbox.subscriptions
        assert followed.untracked and topics[-1] not in followed
        results = [app.send_task("tests.tasks.add", (i, 0)) for i in range(100)]
        late = app.send_task("tests.tasks.add", (20, 22), task_id="late")
        assert [r.get(timeout=30) for r in results] == list(range(100))
        assert late.get(timeout=10) == 42
        frames = _recv(subs[-1])
        assert frames[1] == p.RESULT and p.decode(frames[3]) == 42
    finally:
        for item in subs:
            item.close()
        app.close()
        embedded.stop()


def test_a_result_nobody_waits_for_any_more_is_not_asked_for_again(app, broker):
    """A FETCH wait whose AsyncResult is gone is dropped when it falls due (here after a
    broker restart, when every wait is asked again), not renewed for ever. The client
    polls STATUS all along: busy as it is, it must still heartbeat to learn of the
    restart (it used to heartbeat only when it had sent nothing for a second)."""
    gone = app.AsyncResult("no-such-task")
    with pytest.raises(zq.TimeoutError):
        gone.get(timeout=0.3)
    assert "no-such-task" in app.client._watched
    del gone
    gc.collect()
    broker.kill()
    broker.restart()
    wait_for(
        lambda: app.status(timeout=5) and "no-such-task" not in app.client._watched,
        20,
        "the forgotten wait to be dropped",
    )
