"""`extproc bench events`: how many KV-cache event blocks one picker process indexes while it routes.

The picker runs ``precise_prefix`` against simulated replicas (time scale 0, for its scrapes and render
calls). The benchmark itself publishes vLLM-format KV events for every replica on its events port (the
replica's port + 1), at a fixed offered rate of blocks per second across all of them: BlockStored events of
32 blocks of 16 tokens, chained eight deep, and, once a replica's index holds ``--capacity`` blocks, a
BlockRemoved of its oldest 32 blocks with each new store, so the index stays at its bound as under real
cache pressure. Meanwhile client processes drive the picker's gRPC interface closed loop (as `bench picker`
does). Reported per offered rate: blocks indexed per second (the picker's counter), gaps (messages ZMQ
dropped because the picker fell behind), routed requests per second and the mean decision time, the
picker's CPU and its resident memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from extproc.cli import DefaultsHelp

MODEL = "bench-model"
BLOCK_SIZE = 16
BLOCKS_PER_EVENT = 32
CHAIN_EVENTS = 8  # a prompt of 256 blocks, stored in eight steps


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "events",
        help="KV-event ingestion: blocks/s one picker indexes while routing, at offered rates",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--rates", default="25000,50000,100000", help="offered blocks/s across all replicas, one case each")
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas, each with its own event stream")
    p.add_argument("--capacity", type=int, default=50_000, help="blocks each replica holds before it evicts")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per case")
    p.add_argument("--clients", type=int, default=1, help="routing client processes (0: ingestion only)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


class Publisher:
    """One replica's event stream: a PUB socket on its events port, fed at ``rate`` blocks/s by a thread."""

    def __init__(self, port: int, capacity: int, seed: int) -> None:
        import numpy as np
        import zmq

        from extproc.sim.kv_events import BlockRemoved, BlockStored, EventBatch

        self._np, self._stored_cls, self._removed_cls, self._batch_cls = np, BlockStored, BlockRemoved, EventBatch
        self._rng = np.random.default_rng(seed)
        self._pool: list[int] = self._rng.integers(0, 128_000, 1 << 20).tolist()  # token ids to slice from
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(100_000)
        self._pub.bind(f"tcp://127.0.0.1:{port}")
        self._capacity = capacity
        self._held: deque[int] = deque()
        self._next_hash = seed << 40
        self._parent: int | None = None
        self._chain = 0
        self._seq = 0
        self.sent_blocks = 0
        self.rate = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _batch(self) -> bytes:
        import msgspec

        hashes = list(range(self._next_hash, self._next_hash + BLOCKS_PER_EVENT))
        self._next_hash += BLOCKS_PER_EVENT
        start = int(self._rng.integers(0, len(self._pool) - BLOCKS_PER_EVENT * BLOCK_SIZE))
        tokens = self._pool[start : start + BLOCKS_PER_EVENT * BLOCK_SIZE]  # distinct enough to hash apart
        events: list[Any] = [self._stored_cls(hashes, self._parent, tokens, BLOCK_SIZE, None, "GPU", None)]
        self._chain += 1
        self._parent = None if self._chain % CHAIN_EVENTS == 0 else hashes[-1]
        self._held.extend(hashes)
        if len(self._held) > self._capacity:
            events.append(self._removed_cls([self._held.popleft() for _ in range(BLOCKS_PER_EVENT)], "GPU"))
        return msgspec.msgpack.encode(self._batch_cls(time.time(), events, 0))

    def _run(self) -> None:
        import zmq

        due = 0.0
        last = time.monotonic()
        while not self._stop.is_set():
            time.sleep(0.005)
            now = time.monotonic()
            due += self.rate * (now - last) / BLOCKS_PER_EVENT
            last = now
            while due >= 1:
                due -= 1
                payload = self._batch()
                with contextlib.suppress(zmq.Again):  # past the high-water mark: dropped, as vLLM's PUB would
                    self._pub.send_multipart((b"kv", self._seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
                self._seq += 1
                self.sent_blocks += BLOCKS_PER_EVENT

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pub.close(linger=0)
        self._ctx.term()


def run(args: argparse.Namespace) -> int:
    from extproc.bench.machine import describe, summary_line
    from extproc.bench.peers.cpu import tree_seconds
    from extproc.bench.picker_load import _samples
    from extproc.local.procs import Child, SimStart, extproc_argv, free_port, free_port_blocks, start_sims

    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    log_dir = Path(tempfile.mkdtemp(prefix="extproc-bench-events-"))
    print(summary_line(describe()), flush=True)
    print(f"logs in {log_dir}; {args.replicas} replicas, {args.capacity:,} blocks each at most, "
          f"{args.clients} routing client(s), {args.duration:g}s per rate", flush=True)  # fmt: skip
    children: list[Child] = []
    publishers: list[Publisher] = []
    results: dict[str, Any] = {"cases": []}
    try:
        ports = free_port_blocks(args.replicas, 2)  # HTTP, and the events this benchmark publishes on + 1
        children += start_sims(
            [SimStart(f"sim-{i}", MODEL, p, ("--time-scale", "0")) for i, p in enumerate(ports)], log_dir
        )
        publishers += [Publisher(p + 1, args.capacity, seed=i + 1) for i, p in enumerate(ports)]
        listen, metrics = free_port(), free_port()
        scorer = {"name": "precise_prefix", "weight": 4, "params": {"port_offset": 1, "max_blocks": args.capacity * 2}}
        config = {
            "server": {"listen": f"127.0.0.1:{listen}", "metrics_listen": f"127.0.0.1:{metrics}"},
            "pools": [{"name": "bench", "models": [MODEL], "endpoints": {"static": [f"127.0.0.1:{p}" for p in ports]}}],
            "scheduler": {"scorers": [scorer, {"name": "queue", "weight": 1}]},
        }
        path = log_dir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        picker = Child("picker", extproc_argv("serve", "--config", str(path)), log_dir)
        children.append(picker)
        picker.wait_http(f"http://127.0.0.1:{metrics}/metrics")
        time.sleep(1.0)  # the subscriptions connect
        print(f"{'offered blk/s':>14}{'sent blk/s':>12}{'indexed blk/s':>15}{'gaps':>7}{'routed req/s':>14}"
              f"{'decision us':>13}{'picker CPU %':>14}{'index blocks':>14}{'RSS MB':>8}", flush=True)  # fmt: skip
        for rate in rates:
            for pub in publishers:
                pub.rate = rate / len(publishers)
            time.sleep(1.0)  # reach the rate
            before = _totals(_samples(f"http://127.0.0.1:{metrics}/metrics"))
            cpu_before = tree_seconds({"picker": [picker.pid]})["picker"]
            sent_before = sum(pub.sent_blocks for pub in publishers)
            started = time.monotonic()
            routed = _route(listen, args, log_dir) if args.clients else 0
            time.sleep(max(0.0, args.duration - (time.monotonic() - started)))
            elapsed = time.monotonic() - started
            cpu = tree_seconds({"picker": [picker.pid]})["picker"] - cpu_before
            sent = sum(pub.sent_blocks for pub in publishers) - sent_before
            after = _totals(_samples(f"http://127.0.0.1:{metrics}/metrics"))
            decisions = after["decisions"] - before["decisions"]
            row = {
                "offered_blocks_per_second": rate,
                "sent_blocks_per_second": sent / elapsed,
                "indexed_blocks_per_second": (after["stored"] - before["stored"]) / elapsed,
                "gaps": after["gaps"] - before["gaps"],
                "routed_per_second": routed / elapsed,
                "decision_mean_us": (after["decided"] - before["decided"]) / decisions * 1e6 if decisions else 0.0,
                "picker_cpu_share": cpu / elapsed,
                "index_blocks": after["blocks"],
                "picker_rss_mb": _rss_mb(picker.pid),
            }
            results["cases"].append(row)
            print(f"{rate:>14,.0f}{row['sent_blocks_per_second']:>12,.0f}{row['indexed_blocks_per_second']:>15,.0f}{row['gaps']:>7.0f}"
                  f"{row['routed_per_second']:>14,.0f}{row['decision_mean_us']:>13.1f}"
                  f"{100 * row['picker_cpu_share']:>14.0f}{row['index_blocks']:>14,.0f}"
                  f"{row['picker_rss_mb']:>8.0f}", flush=True)  # fmt: skip
    finally:
        for pub in publishers:
            pub.close()
        for child in reversed(children):
            child.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _route(listen: int, args: argparse.Namespace, log_dir: Path) -> int:
    """Closed-loop ext_proc streams from ``args.clients`` processes for ``args.duration`` s; the routed count."""
    start_at = time.time() + 0.5
    end_at = start_at + args.duration - 1.0
    argv = [sys.executable, "-m", "extproc.bench.picker_load", "--client", f"127.0.0.1:{listen}", "2", "4"]
    argv += [repr(start_at), repr(end_at)]
    with (log_dir / "clients.log").open("ab") as log:
        clients = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log) for _ in range(args.clients)]
    outputs = [json.loads(c.communicate(timeout=args.duration + 60)[0] or b"{}") for c in clients]
    return int(sum(o.get("completed", 0) for o in outputs))


def _totals(samples: list[tuple[str, float]]) -> dict[str, float]:
    out = {"stored": 0.0, "gaps": 0.0, "decisions": 0.0, "decided": 0.0, "blocks": 0.0}
    for name, value in samples:
        if name == "extproc_kv_events_blocks_stored_total":
            out["stored"] += value
        elif name == "extproc_kv_events_gaps_total":
            out["gaps"] += value
        elif name == "extproc_decision_duration_seconds_count":
            out["decisions"] += value
        elif name == "extproc_decision_duration_seconds_sum":
            out["decided"] += value
        elif name == "extproc_precise_prefix_index_blocks":
            out["blocks"] += value
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
