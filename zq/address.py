"""Broker addresses: the forms a client or worker can connect to, checked up front.

ZeroMQ refuses a bad address only when a socket connects to it, and a client's socket
connects in its I/O thread, where the caller never sees the error: its ``get()`` just
timed out. :func:`check_broker_url` says what is wrong where the address is given::

    zq.App("tasks", broker="127.0.0.1:5555")
    # ValueError: broker '127.0.0.1:5555' has no scheme: did you mean
    # 'tcp://127.0.0.1:5555'? A broker address is tcp://HOST:PORT (...) or ipc://PATH (...).

Imports no other part of zq, so that the client, the worker and the command line can
all use it.
"""

from __future__ import annotations

import ipaddress
import re

#: What the error messages offer.
ACCEPTED = (
    "A broker address is tcp://HOST:PORT (a host name or an IPv4 address, "
    "e.g. tcp://10.0.0.5:5555) or ipc://PATH (a Unix socket on this machine)."
)

#: Schemes of the brokers Celery and Kombu use (before any ``+``, as in ``sqla+sqlite``).
_OTHER_BROKERS = {
    "amqp": "an AMQP (RabbitMQ)",
    "amqps": "an AMQP (RabbitMQ)",
    "pyamqp": "an AMQP (RabbitMQ)",
    "librabbitmq": "an AMQP (RabbitMQ)",
    "redis": "a Redis",
    "rediss": "a Redis",
    "sentinel": "a Redis Sentinel",
    "sqs": "an Amazon SQS",
    "sqla": "an SQLAlchemy",
    "mongodb": "a MongoDB",
    "kafka": "a Kafka",
    "memory": "a Kombu in-memory",
    "filesystem": "a Kombu filesystem",
}

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
#: Longest ``ipc://`` path: a Unix socket address holds 108 bytes with the final NUL.
_MAX_IPC_PATH = 107


def check_broker_url(url: object, *, what: str = "broker") -> str:
    """Return ``url`` if a zq client or worker can connect to a broker there.

    Raises :class:`ValueError` saying what is wrong and which forms are accepted
    (``tcp://HOST:PORT`` with a host name or an IPv4 address, ``ipc://PATH``), and
    :class:`TypeError` for a non-string. ``what`` names the address in the message
    (``$ZQ_BROKER``, ``--broker``). It checks the form only: whether the host
    resolves and a broker answers is learnt by connecting.
    """
    if not isinstance(url, str):
        raise TypeError(f"{what} must be a string such as 'tcp://10.0.0.5:5555', got {url!r:.60}")
    problem = _problem(url)
    if problem is not None:
        raise ValueError(f"{what} {url!r} {problem} {ACCEPTED}")
    return url


def _problem(url: str) -> str | None:
    """What is wrong with ``url`` as a broker address (a phrase after the address)."""
    if url != url.strip():
        return "has spaces around it."
    scheme, sep, rest = url.partition("://")
    if not sep:
        if re.fullmatch(r"[^\s:/]+:\d+", url):
            return f"has no scheme: did you mean 'tcp://{url}'?"
        return "has no scheme."
    family = scheme.lower().partition("+")[0]
    if family in _OTHER_BROKERS:
        return (
            f"is {_OTHER_BROKERS[family]} URL, but zq has its own broker: start it with "
            "`zq broker --bind tcp://0.0.0.0:5555` and give its address here, "
            "tcp://BROKER-HOST:5555."
        )
    if scheme != scheme.lower() and scheme.lower() in ("tcp", "ipc", "inproc"):
        return f"has an upper-case scheme: write '{scheme.lower()}://'."
    if scheme == "tcp":
        return _tcp_problem(rest)
    if scheme == "ipc":
        return _ipc_problem(rest)
    if scheme == "inproc":
        return (
            "cannot reach a broker: inproc:// joins sockets of one ZeroMQ context, and "
            "every zq client, worker and broker makes its own; on one machine use "
            "ipc://PATH or tcp://127.0.0.1:PORT."
        )
    return f"has an unknown scheme {scheme!r}."


def _tcp_problem(rest: str) -> str | None:
    host, colon, port = rest.rpartition(":")
    if "/" in rest:
        return "has a path, and a zq broker has none (no database number, no vhost)."
    if ";" in rest:
        return "has a source address (HOST;HOST:PORT), which zq does not take."
    if not colon or not host:
        return "has no port: write tcp://HOST:PORT, e.g. tcp://10.0.0.5:5555."
    if port == "*" or host == "*":
        return (
            "is a bind address ('*' means any): a broker binds it, and peers connect "
            "to the host and port the broker listens on (`zq broker` prints them)."
        )
    if not port.isascii() or not port.isdigit():
        return f"has a port {port!r} that is not a number."
    if not 1 <= int(port) <= 65535:
        return f"has a port {port} that is not in 1..65535."
    return _host_problem(host)


def _host_problem(host: str) -> str | None:
    if host.startswith("[") or ":" in host:
        return (
            "has an IPv6 address, and zq's sockets do not enable IPv6: give an IPv4 "
            "address or a host name."
        )
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"has a host {host!r} that is not an IPv4 address."
        return None
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        return f"has a host {host!r} that is not a host name or an IPv4 address."
    return None


def _ipc_problem(path: str) -> str | None:
    if not path:
        return "has no path: write ipc://PATH, e.g. ipc:///run/zq/broker.sock."
    if path == "*":
        return "is a bind address ('*' means any): connect to the path the broker bound."
    if len(path.encode()) > _MAX_IPC_PATH:
        return f"has a path longer than {_MAX_IPC_PATH} bytes, a Unix socket's limit."
    return None
