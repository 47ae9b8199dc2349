"""CURVE encryption and authentication, through ``zmq.auth``.

Every peer has a key pair, made with ``zq keys generate DIR NAME`` (``NAME.key`` holds
the public key, ``NAME.key_secret`` both keys). The broker serves with its secret key
and accepts only clients and workers whose public keys are in its authorized-keys
directory; peers need their own secret file and the broker's public key file.
``docs/security.md`` covers key distribution and the threat model.

Thread ownership: the :class:`Authorizer` runs ``zmq.auth``'s ZAP handler on a thread
of its own, on the broker's context; :meth:`Authorizer.reload` may be called from the
broker's loop (it talks to that thread through its pipe).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("zq.security")


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair (Z85 text, as zmq.auth stores it)."""

    public: bytes
    secret: bytes


def generate(directory: str, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) to DIR."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_pair(path: str) -> KeyPair:
    """The key pair in a ``.key_secret`` file; ValueError if it holds no secret key."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public(path: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    public, _ = zmq.auth.load_certificate(path)
    return public


def serve_with(sock: zmq.Socket, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE server (set before bind)."""
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


@dataclass(frozen=True)
class ClientCurve:
    """What a client or worker needs to reach a CURVE broker."""

    keys: KeyPair
    broker_key: bytes

    @classmethod
    def from_files(cls, secret_file: str | None, broker_key_file: str | None) -> ClientCurve | None:
        """The keys in these files; None if neither is given (a plain broker).
        ValueError if only one is."""
        if (secret_file is None) != (broker_key_file is None):
            raise ValueError("CURVE needs both a secret key file and the broker's key (or neither)")
        if secret_file is None or broker_key_file is None:
            return None
        return cls(load_pair(secret_file), load_public(broker_key_file))

    def apply(self, sock: zmq.Socket) -> None:
        """Set the socket's keys (before connect)."""
        sock.curve_serverkey = self.broker_key
        sock.curve_publickey = self.keys.public
        sock.curve_secretkey = self.keys.secret


class Authorizer:
    """The broker's allow-list: public keys in a directory, reloaded when it changes."""

    def __init__(self, context: zmq.Context, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ValueError(f"authorized keys directory {directory!r} does not exist")
        self.directory = directory
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("zq.auth"))
        self._auth.start()
        self._stamp: tuple[float, int] | None = None
        self.reload()

    def _current_stamp(self) -> tuple[float, int]:
        newest, count = os.stat(self.directory).st_mtime, 0
        for entry in os.scandir(self.directory):
            count += 1
            try:  # a file can vanish between the listing and the stat (a revocation)
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except OSError:
                newest = float("inf")  # changed under us: look again next time
        return newest, count

    def reload(self) -> int:
        """Read the directory's public keys again; returns how many are authorized."""
        stamp = self._current_stamp()
        self._auth.configure_curve(domain="*", location=self.directory)
        self._stamp = stamp
        count = sum(1 for p in Path(self.directory).glob("*.key"))
        log.info("authorized keys: %d in %s", count, self.directory)
        return count

    def reload_if_changed(self) -> bool:
        """Reload when a file in the directory was added, removed or modified."""
        if self._current_stamp() != self._stamp:
            self.reload()
            return True
        return False

    def stop(self) -> None:
        self._auth.stop()
