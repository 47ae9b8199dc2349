"""Pure state: the broker's registry of connected workers, and their liveness.

No sockets here. The broker asks this registry whether a READY is current or a late
one from a worker's earlier connection, which workers have been silent past the
dead-after window, and which workers that held tasks before a restart have not come
back within their grace; it sends and logs what follows. (The tasks a worker holds
and its credit are :class:`zq.dispatch.Dispatcher`'s.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from zq.dispatch import RunTimes


class Peer:
    """A connected worker's identity and liveness, as the socket loop sees it."""

    __slots__ = ("ident", "info", "last_seen", "ready_sent", "runtimes", "slots", "wid")

    def __init__(
        self, ident: bytes, wid: bytes, info: dict[str, Any], now: float, slots: int
    ) -> None:
        self.ident = ident  # its connection's routing identity
        self.wid = wid  # its stable id (one worker process)
        self.info = info  # what its READY said, for status and events
        self.last_seen = now
        self.ready_sent: float | None = None  # its READY's "t" (the worker's clock)
        self.slots = slots  # its concurrency; 0 while it drains (it gets no more tasks)
        self.runtimes = RunTimes()  # for the automatic prefetch

    def capacity(self, prefetch: int | None) -> int:
        """Tasks it may hold: its slots, plus ``prefetch`` or (None) the automatic
        prefetch its recent run times give (none for tasks of more than a few ms)."""
        if not self.slots:
            return 0
        if prefetch is None:
            prefetch = self.runtimes.prefetch(self.slots)
        return self.slots + prefetch


class Workers:
    """Connected workers by connection and by id, and the workers a restarted broker
    still waits for (placeholders: their tasks keep their keys until they re-attach)."""

    def __init__(self) -> None:
        self._by_ident: dict[bytes, Peer] = {}
        self._by_wid: dict[bytes, Peer] = {}
        self._expected: dict[bytes, float] = {}  # worker id -> re-attach deadline

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._by_ident.values())

    def __len__(self) -> int:
        return len(self._by_ident)

    def get(self, ident: bytes) -> Peer | None:
        """The worker on this connection, if one registered."""
        return self._by_ident.get(ident)

    def find(self, wid: bytes) -> Peer | None:
        """The worker with this id, if connected."""
        return self._by_wid.get(wid)

    def is_late(self, ident: bytes, wid: bytes, sent: float | None) -> bool:
        """True if a READY from ``wid`` on ``ident`` sent at ``sent`` comes from an
        earlier connection than the registered one, delivered late: after a partition
        heals, TCP resends a dead connection's data on its backed-off timer while a new
        connection gets through at once. Taken for current, it would drop the live
        registration and hand the tasks it runs, and their keys, to others at once.
        (The same worker, so the same clock; a READY without a time is never late.)"""
        old = self._by_wid.get(wid)
        return (
            old is not None
            and old.ident != ident
            and sent is not None
            and old.ready_sent is not None
            and sent < old.ready_sent
        )

    def other_on(self, ident: bytes, wid: bytes) -> Peer | None:
        """The worker registered on this connection under another id, if any (it must
        be dropped before ``wid`` registers there)."""
        peer = self._by_ident.get(ident)
        return peer if peer is not None and peer.wid != wid else None

    def register(self, peer: Peer) -> None:
        """A READY: ``peer`` replaces whatever this worker's id had (a worker on a new
        connection keeps its tasks: the dispatcher re-attaches them)."""
        old = self._by_wid.get(peer.wid)
        if old is not None and old.ident != peer.ident:
            del self._by_ident[old.ident]
        self._by_ident[peer.ident] = self._by_wid[peer.wid] = peer
        self._expected.pop(peer.wid, None)  # it came back

    def remove(self, peer: Peer) -> None:
        """The worker left or was declared dead."""
        del self._by_ident[peer.ident]
        if self._by_wid.get(peer.wid) is peer:
            del self._by_wid[peer.wid]

    def silent(self, now: float, dead_after: float) -> list[Peer]:
        """Workers not heard from for more than ``dead_after`` seconds."""
        return [peer for peer in self._by_ident.values() if now - peer.last_seen > dead_after]

    def expect(self, wids: set[bytes], deadline: float) -> None:
        """After a restart: these workers held tasks; wait until ``deadline`` for each
        to come back and re-attach them."""
        for wid in wids:
            self._expected[wid] = deadline

    def expected(self) -> int:
        """How many workers a restarted broker still waits for."""
        return len(self._expected)

    def not_back(self, now: float) -> list[bytes]:
        """The expected workers whose grace ran out (each given up on once)."""
        lapsed = [wid for wid, deadline in self._expected.items() if now >= deadline]
        for wid in lapsed:
            del self._expected[wid]
        return lapsed
