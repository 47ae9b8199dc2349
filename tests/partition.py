"""A loopback TCP proxy that can hold back one direction of its traffic: a network
partition between a worker and the broker that only the tests' own sockets see."""

from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlsplit

UP, DOWN = "up", "down"  # towards the broker; towards the peer


class Partition:
    """Forwards connections made to :attr:`endpoint` to ``target`` (a ``tcp://`` ZeroMQ
    endpoint). While a direction is held its bytes wait in the proxy (and then in the
    kernel's buffers), as on a link that lost its route: TCP stays up, nothing
    arrives; :meth:`heal` lets them through, in order."""

    def __init__(self, target: str) -> None:
        address = urlsplit(target)
        self._target = (address.hostname, address.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open = {UP: threading.Event(), DOWN: threading.Event()}
        self.heal()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def hold(self, direction: str) -> None:
        """Stop passing bytes in ``direction`` (UP: peer to broker; DOWN: back)."""
        self._open[direction].clear()

    def heal(self) -> None:
        for gate in self._open.values():
            gate.set()

    def close(self) -> None:
        self._closed.set()
        self.heal()
        for thread in self._threads:  # each sees the flag within 0.05 s
            thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            if not select.select([self._listener], [], [], 0.05)[0]:
                continue
            peer, _ = self._listener.accept()
            broker = socket.create_connection(self._target, timeout=5)
            peer.settimeout(5)  # a send never blocks close() for longer
            self._sockets += [peer, broker]
            for src, dst, direction in ((peer, broker, UP), (broker, peer, DOWN)):
                thread = threading.Thread(
                    target=self._pump, args=(src, dst, self._open[direction]), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, gate: threading.Event) -> None:
        try:
            while not self._closed.is_set():
                if not gate.wait(0.05) or not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: the other pump closed them
            pass  # one end went away: end both, as a router would
        for sock in (src, dst):
            sock.close()
