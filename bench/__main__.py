"""``python -m bench``: run zq's benchmarks, print a table, write JSON.

Run from the repository root (the workers import ``bench.tasks``). Every process
started is killed by pid when its benchmark ends, whatever happens; all on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import keyed, latency, limit, peers, report, scale, throughput
from bench.common import ROOT, Row, machine

BENCHES = ("limit", "throughput", "latency", "keyed", "memory", "keys", "heartbeats", "peers")
GROUPS = {"scale": ("memory", "keys", "heartbeats"), "all": BENCHES}
NEEDS_LIMIT = {"limit", "throughput", "latency", "peers"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="zq benchmarks: each zq figure next to the limit (a bare pyzmq "
        "forwarder pipeline) measured in the same run. Medians of --repeats rounds. "
        "Run from the repository root. See docs/performance.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--only",
        default="all",
        help="comma-separated benchmarks: "
        + ", ".join(BENCHES)
        + "; 'scale' = memory,keys,heartbeats (the limit runs whenever a figure needs it)",
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write JSON"
    )
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput round")
    parser.add_argument("--window", type=int, default=1000, help="limit: tasks in flight")
    parser.add_argument("--samples", type=int, default=300, help="latency samples per round")
    parser.add_argument("--warmup", type=int, default=50, help="latency warm-up tasks")
    parser.add_argument(
        "--keyed-work", type=float, default=96.0, help="keyed: seconds of sleep per round"
    )
    parser.add_argument("--keyed-keys", type=int, default=100, help="keyed: distinct keys")
    parser.add_argument("--keyed-workers", type=int, default=2, help="keyed: worker processes")
    parser.add_argument("--keyed-slots", type=int, default=4, help="keyed: thread slots each")
    parser.add_argument(
        "--queued",
        type=int,
        default=200_000,
        help="memory: tasks queued in the broker (the issue's figure is 1,000,000)",
    )
    parser.add_argument(
        "--keys", type=int, default=100_000, help="keys: tasks queued, on 1 key or each its own"
    )
    parser.add_argument("--drain", type=int, default=10_000, help="keys: results timed")
    parser.add_argument("--workers", type=int, default=200, help="heartbeats: idle workers")
    parser.add_argument(
        "--heartbeat-seconds", type=float, default=10.0, help="heartbeats: seconds measured"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also sample broker, worker and client with py-spy under load (needs py-spy)",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=8.0, help="profile: seconds sampled"
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="profile: include C frames (libzmq, system calls); pauses the processes",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke test (figures not comparable)",
    )
    args = parser.parse_args(argv)
    selected: list[str] = []
    for name in (n.strip() for n in args.only.split(",") if n.strip()):
        if name not in BENCHES and name not in GROUPS:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}, scale")
        selected += GROUPS.get(name, (name,))
    args.selected = [b for b in BENCHES if b in selected]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quick:
        args.repeats, args.tasks, args.samples, args.warmup = 2, 1000, 50, 10
        args.keyed_work, args.queued, args.keys, args.drain = 6.0, 20_000, 10_000, 2000
        args.workers, args.heartbeat_seconds, args.profile_seconds = 50, 3.0, 3.0
    return args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine()
    log(
        f"zq bench on {host['nproc']} x {host['cpu_model']}, Python {host['python']}, "
        f"pyzmq {host['pyzmq']} (libzmq {host['libzmq']}); running {', '.join(args.selected)}"
    )
    out: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "results": {},
    }
    rows: list[Row] = []
    started = time.monotonic()
    lim: dict[str, Any] = {}

    def section(name: str) -> float:
        log(f"[{name}]")
        return time.monotonic()

    def done(name: str, t0: float, result: dict[str, Any], new: list[Row]) -> None:
        result["seconds"] = round(time.monotonic() - t0, 1)
        out["results"][name] = result
        rows.extend(new)
        log(f"  ({result['seconds']}s)")

    # The limit's pipeline stays up through the throughput section: each zq round there
    # is paired with a limit round just before it, on the machine as it is then.
    with contextlib.ExitStack() as limit_stack:
        if NEEDS_LIMIT & set(args.selected):
            t0 = section("limit")
            lim, new, pipe = limit.run(
                limit_stack,
                tasks=args.tasks * 4,
                repeats=max(3, args.repeats),
                window=args.window,
                samples=args.samples,
            )
            log(
                f"  limit: {lim['tasks_per_s']:,.0f} tasks/s pipelined, round trip "
                f"p50 {lim['latency_ms_p50']:.3f} ms, p99 {lim['latency_ms_p99']:.3f} ms"
            )
            done("limit", t0, lim, new)
        if "throughput" in args.selected:
            t0 = section("throughput")
            result, new = throughput.run(
                limit=lim["tasks_per_s"],
                limit_round=lambda: pipe.pipelined(args.tasks * 4, args.window),
                tasks=args.tasks,
                repeats=args.repeats,
                log=log,
            )
            done("throughput", t0, result, new)
    if "latency" in args.selected:
        t0 = section("latency")
        result, new = latency.run(
            limit_p50=lim["latency_ms_p50"],
            limit_p99=lim["latency_ms_p99"],
            samples=args.samples,
            warmup=args.warmup,
            repeats=args.repeats,
            log=log,
        )
        done("latency", t0, result, new)
    if "keyed" in args.selected:
        t0 = section("keyed")
        result, new = keyed.run(
            work=args.keyed_work,
            keys=args.keyed_keys,
            workers=args.keyed_workers,
            slots=args.keyed_slots,
            repeats=args.repeats,
            log=log,
        )
        done("keyed", t0, result, new)
    if "memory" in args.selected:
        t0 = section("memory")
        result, new = scale.memory(args.queued, log=log)
        done("memory", t0, result, new)
    if "keys" in args.selected:
        t0 = section("keys")
        result, new = scale.keys(args.keys, args.drain, args.repeats, log=log)
        done("keys", t0, result, new)
    if "heartbeats" in args.selected:
        t0 = section("heartbeats")
        result, new = scale.heartbeats(args.workers, args.heartbeat_seconds, args.repeats, log=log)
        done("heartbeats", t0, result, new)
    if "peers" in args.selected:
        t0 = section("peers")
        result, new = peers.run(
            limit=lim["tasks_per_s"],
            limit_p50=lim["latency_ms_p50"],
            tasks=args.tasks,
            samples=args.samples,
            repeats=args.repeats,
            log=log,
        )
        done("peers", t0, result, new)
        rows += peers.ratios(out["results"])
    if args.profile:
        t0 = section("profile")
        from bench import profile

        result = profile.run(seconds=args.profile_seconds, native=args.profile_native, log=log)
        done("profile", t0, result, [])

    out["rows"] = [r.as_dict() for r in rows]
    out["seconds"] = round(time.monotonic() - started, 1)
    report.write_json(args.json, out)
    print(report.text_table(rows))
    if "peers" in args.selected and "skipped" in out["results"].get("peers", {}):
        print(f"\npeers: skipped ({out['results']['peers']['skipped']})")
    if args.markdown:
        print()
        print(report.markdown_table(rows))
    print(f"\n{len(rows)} figures in {out['seconds']:.0f}s; JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
