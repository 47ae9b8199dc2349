"""zq's benchmark suite: ``python -m bench`` (see ``--help`` and docs/performance.md).

Every zq figure is reported next to the *limit* measured in the same run: the
thinnest pipeline Python and pyzmq allow on this machine (a DEALER client, a bare
ROUTER/ROUTER forwarder process and an echo worker process over TCP loopback,
msgpack-encoded tasks, pipelined). Modules, one benchmark each:

* :mod:`bench.limit` - the ceiling (throughput and one-at-a-time latency)
* :mod:`bench.throughput` - trivial tasks end to end, journal off and on
* :mod:`bench.latency` - one task at a time on an idle system: p50, p99
* :mod:`bench.keyed` - keyed scheduling: makespan against the ideal bound
* :mod:`bench.scale` - memory per queued task, 1 vs many keys, heartbeat CPU
* :mod:`bench.peers` - Celery + Redis, only when both are installed
"""
