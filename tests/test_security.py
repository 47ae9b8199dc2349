"""CURVE: only authorised peers get in, and what crosses the wire cannot be read."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import zq
from zq.security import generate
from zq.testing import BrokerProcess, WorkerProcess, wait_for

SECRET = "card-4111-1111-1111-1111"  # a task argument that must not be readable


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Key pairs for a broker, a client, a worker and an intruder; the first three
    authorised (the client's and the worker's public keys in the allow-list)."""
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    out: dict[str, Path] = {"authorized": allowed}
    for name in ("broker", "client", "worker", "intruder", "latecomer"):
        public, secret = generate(str(tmp_path / name), name)
        out[name] = secret
        out[name + ".pub"] = public
        if name in ("client", "worker"):
            shutil.copy(public, allowed)
    return out


@pytest.fixture
def secure_broker(keys) -> Iterator[BrokerProcess]:
    extra = ["--curve-secret", str(keys["broker"]), "--authorized-keys", str(keys["authorized"])]
    with BrokerProcess("tcp://127.0.0.1:*", *extra) as proc:
        yield proc


def _app(broker: BrokerProcess, secret: Path | None, broker_key: Path | None) -> zq.App:
    return zq.App(
        "sec",
        broker=broker.endpoint,
        curve_secret=secret and str(secret),
        broker_key=broker_key and str(broker_key),
    )


def _worker(broker: BrokerProcess, keys, name: str) -> WorkerProcess:
    env = {"ZQ_CURVE_SECRET": str(keys[name]), "ZQ_BROKER_KEY": str(keys["broker.pub"])}
    return WorkerProcess("tests.tasks", broker.endpoint, concurrency=1, env=env)


def test_authorised_peers_work_end_to_end(secure_broker, keys):
    app = _app(secure_broker, keys["client"], keys["broker.pub"])
    try:
        with _worker(secure_broker, keys, "worker") as worker:
            wait_for(
                lambda: worker.pid in {w["pid"] for w in app.status()["workers"]}, 20, "the worker"
            )
            res = app.send_task("tests.tasks.add", [SECRET, "!"])
            assert res.get(timeout=10) == SECRET + "!"
            assert app.status()["security"] == "curve"
    finally:
        app.close()


def test_unauthorised_client_cannot_submit_or_read(secure_broker, keys):
    intruder = _app(secure_broker, keys["intruder"], keys["broker.pub"])
    plain = _app(secure_broker, None, None)
    insider = _app(secure_broker, keys["client"], keys["broker.pub"])
    try:
        for app in (intruder, plain):
            app.send_task("tests.tasks.add", [1, 2])
            assert not app.client.flush(2.0), "the broker accepted a task from an outsider"
            with pytest.raises(zq.BrokerUnavailable):
                app.status(timeout=1.0)
        assert insider.status()["counters"].get("accepted", 0) == 0
    finally:
        for app in (intruder, plain, insider):
            app.close(flush=False)


def test_client_with_the_wrong_broker_key_cannot_connect(secure_broker, keys):
    confused = _app(secure_broker, keys["client"], keys["intruder.pub"])
    try:
        with pytest.raises(zq.BrokerUnavailable):
            confused.status(timeout=1.5)
    finally:
        confused.close(flush=False)


def test_unauthorised_worker_gets_no_tasks(secure_broker, keys):
    app = _app(secure_broker, keys["client"], keys["broker.pub"])
    try:
        with _worker(secure_broker, keys, "intruder") as intruder:
            res = app.send_task("tests.tasks.add", [1, 2])
            assert app.client.flush(5)
            with pytest.raises(zq.TimeoutError):
                res.get(timeout=2.0)
            assert intruder.pid not in {w["pid"] for w in app.status()["workers"]}
            assert res.status == "QUEUED"
    finally:
        app.close()


def test_new_keys_are_picked_up_without_a_restart(secure_broker, keys):
    late = _app(secure_broker, keys["latecomer"], keys["broker.pub"])
    try:
        with pytest.raises(zq.BrokerUnavailable):
            late.status(timeout=1.0)
        shutil.copy(keys["latecomer.pub"], keys["authorized"])
        wait_for(lambda: _answers(late), 15, "the new key to be accepted")
    finally:
        late.close(flush=False)


def _answers(app: zq.App) -> bool:
    try:
        app.status(timeout=1.0)
        return True
    except zq.BrokerUnavailable:
        return False


class _Tap:
    """A TCP relay in front of the broker that keeps a copy of every byte it relays."""

    def __init__(self, target_port: int) -> None:
        self.seen = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                self.seen += chunk
                dst.sendall(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("curve", [True, False])
def test_task_arguments_are_unreadable_on_the_wire(curve, keys, broker, secure_broker):
    """Control: on a plain broker the secret shows in the relayed bytes; with CURVE not."""
    target = secure_broker if curve else broker
    tap = _Tap(int(target.endpoint.rpartition(":")[2]))
    app = zq.App(
        "tap",
        broker=f"tcp://127.0.0.1:{tap.port}",
        curve_secret=str(keys["client"]) if curve else None,
        broker_key=str(keys["broker.pub"]) if curve else None,
    )
    try:
        app.send_task("tests.tasks.add", [SECRET, "!"])
        assert app.client.flush(10)
        assert (SECRET.encode() in tap.seen) is not curve
        assert len(tap.seen) > 100
    finally:
        app.close()
        tap.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_sighup_reloads_keys_and_leaves_the_broker_idle(secure_broker, keys):
    late = _app(secure_broker, keys["latecomer"], keys["broker.pub"])
    try:
        shutil.copy(keys["latecomer.pub"], keys["authorized"])
        secure_broker.signal(signal.SIGHUP)
        wait_for(lambda: _answers(late), 15, "the new key to be accepted")
        # The signal wakes the loop through a pipe; a pipe left unread would make
        # every later poll return at once: a broker spinning a core while idle.
        before, start = _cpu_seconds(secure_broker.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - start >= 1.0, 5, "a second to pass")
        assert _cpu_seconds(secure_broker.pid) - before < 0.3
    finally:
        late.close(flush=False)
