"""`extproc bench picker`: the picker alone, driven over its gRPC interface as Envoy drives it, 1 vs N workers.

No Envoy and no model traffic: client processes open their own connections to `extproc serve [--workers N]`
and run closed-loop ext_proc streams (request headers, then a ~4 KB chat body: a routed request) for a fixed
time. Reported per case: routed requests per second, the picker's CPU per request (every worker, from /proc),
and the clients' CPU, since on a small machine the Python clients compete with the picker for the same cores:
the throughput is then a floor of the picker's ceiling, the CPU per request is the figure that carries over.
Simulated replicas (time scale 0) give the picker real metrics to scrape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from extproc.cli import DefaultsHelp

MODEL = "bench-model"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "picker",
        help="the picker alone over gRPC, closed loop: routed req/s and CPU per request, 1 vs N workers",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--workers", default="1,2", help="comma list of `serve --workers` values, one case each")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--connections", type=int, default=4, help="gRPC connections per client process")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams per connection")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per case")
    p.add_argument("--replicas", type=int, default=4, help="simulated endpoints the picker scrapes")
    p.add_argument("--redis", action="store_true", help="the picker with state.backend: redis (a local redis-server)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from extproc.bench.machine import describe, summary_line
    from extproc.local.procs import Child, SimStart, extproc_argv, free_port, free_port_blocks, free_ports, start_sims

    cases = [int(x) for x in args.workers.split(",") if x.strip()]
    log_dir = Path(tempfile.mkdtemp(prefix="extproc-bench-picker-"))
    print(summary_line(describe()), flush=True)
    print(f"logs in {log_dir}; {args.clients} client processes x {args.connections} connections x {args.streams} "
          f"streams, {args.duration:g}s per case", flush=True)  # fmt: skip
    children: list[Child] = []
    results: dict[str, Any] = {"cases": {}}
    try:
        ports = free_port_blocks(args.replicas)
        children += start_sims(
            [SimStart(f"sim-{i}", MODEL, p, ("--time-scale", "0")) for i, p in enumerate(ports)], log_dir
        )
        sims = [f"127.0.0.1:{p}" for p in ports]
        state: dict[str, Any] = {}
        if args.redis:
            from extproc.local.redis import start_redis

            redis, url = start_redis(log_dir)
            children.append(redis)
            state = {"state": {"backend": "redis", "url": url}}
        print(
            f"{'workers':<9}{'req/s':>9}{'picker CPU us/req':>19}{'decision mean us':>18}{'clients CPU us/req':>20}"
            f"{'per worker':>16}"
        )
        for workers in cases:
            listen, metrics = free_port(), free_ports(workers)  # worker k serves metrics + k
            config = {
                "server": {"listen": f"127.0.0.1:{listen}", "metrics_listen": f"127.0.0.1:{metrics}"},
                "pools": [{"name": "bench", "models": [MODEL], "endpoints": {"static": sims}}],
                **state,
            }
            path = log_dir / f"config-w{workers}.yaml"
            path.write_text(yaml.safe_dump(config))
            argv = extproc_argv("serve", "--config", str(path), "--workers", str(workers))
            picker = Child(f"picker-w{workers}", argv, log_dir)
            children.append(picker)
            for k in range(workers):
                picker.wait_http(f"http://127.0.0.1:{metrics + k}/metrics")
            time.sleep(1.0)  # a few scrapes
            row = _case(args, f"127.0.0.1:{listen}", picker, log_dir, workers, metrics)
            results["cases"][str(workers)] = row
            print(f"{workers:<9}{row['rate']:>9.0f}{row['picker_cpu_us_per_request']:>19.0f}"
                  f"{row['decision_mean_us']:>18.1f}"
                  f"{row['clients_cpu_us_per_request']:>20.0f}{row['per_worker']!s:>16}", flush=True)  # fmt: skip
            picker.stop()
        base = results["cases"].get(str(cases[0]))
        for workers in cases[1:]:
            row = results["cases"][str(workers)]
            ratio = row["picker_cpu_us_per_request"] / base["picker_cpu_us_per_request"]
            row["cpu_ratio_to_first"] = ratio
            print(f"{workers} workers: picker CPU per request {ratio:.2f}x {cases[0]} worker's, "
                  f"{row['rate'] / base['rate']:.2f}x the routed req/s", flush=True)  # fmt: skip
    finally:
        for child in reversed(children):
            child.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _case(
    args: argparse.Namespace, target: str, picker: Any, log_dir: Path, workers: int, metrics: int
) -> dict[str, Any]:
    """Clients count completions between two wall-clock instants; the picker's CPU is read at the same two."""
    from extproc.bench.peers.cpu import tree_seconds

    start_at = time.time() + 2.0  # the clients import, connect and warm up before it
    end_at = start_at + args.duration
    argv = [sys.executable, "-m", "extproc.bench.picker_load", "--client", target]
    argv += [str(args.connections), str(args.streams), repr(start_at), repr(end_at)]
    with (log_dir / "clients.log").open("ab") as log:
        clients = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log) for _ in range(args.clients)]
    time.sleep(max(0.0, start_at - time.time()))
    before = tree_seconds({"picker": [picker.pid]})["picker"]
    time.sleep(max(0.0, end_at - time.time()))
    after = tree_seconds({"picker": [picker.pid]})["picker"]
    outputs = [json.loads(c.communicate(timeout=60)[0] or b"{}") for c in clients]
    if any("completed" not in o for o in outputs):
        raise RuntimeError(f"a client failed; see {log_dir / 'clients.log'}")
    done = max(1, sum(o["completed"] for o in outputs))
    pages = [_samples(f"http://127.0.0.1:{metrics + k}/metrics") for k in range(workers)]
    per_worker = [int(sum(v for name, v in page if name == "extproc_requests_total")) for page in pages]
    decisions = sum(v for page in pages for name, v in page if name == "extproc_decision_duration_seconds_count")
    decided = sum(v for page in pages for name, v in page if name == "extproc_decision_duration_seconds_sum")
    return {
        "workers": workers,
        "completed": done,
        "rate": done / args.duration,
        "picker_cpu_us_per_request": (after - before) / done * 1e6,
        "clients_cpu_us_per_request": sum(o["cpu_seconds"] for o in outputs) / done * 1e6,
        "per_worker": per_worker,
        "decision_mean_us": decided / decisions * 1e6 if decisions else float("nan"),
    }


def _samples(url: str) -> list[tuple[str, float]]:
    """(name, value) of every sample on a /metrics page."""
    import urllib.request

    from extproc.local.promtext import samples

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [(name, value) for name, _labels, value in samples(text)]


def _client_main(target: str, connections: int, streams: int, start_at: float, end_at: float) -> None:
    """One client process: closed-loop ext_proc streams; prints how many completed inside [start_at, end_at)."""
    import grpc
    import orjson

    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    headers = ep.ProcessingRequest()
    for key, value in ((":path", "/v1/chat/completions"), (":method", "POST"), ("content-type", "application/json")):
        h = headers.request_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    system = "You are a helpful assistant. " * 40

    def body(i: int) -> Any:
        chat = {"model": MODEL, "messages": [{"role": "system", "content": f"tenant {i % 16} " + system},
                                             {"role": "user", "content": f"question {i} " * 60}]}  # fmt: skip
        return ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(chat), end_of_stream=True))

    bodies = [body(i) for i in range(256)]

    async def main() -> int:
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        stubs = [ep_grpc.ExternalProcessorStub(c) for c in channels]
        completed = 0

        async def loop(stub: Any, k: int) -> None:
            nonlocal completed
            i = k
            while True:
                if time.time() >= end_at:
                    return
                call = stub.Process()
                await call.write(headers)
                await call.read()
                await call.write(bodies[i % len(bodies)])
                await call.read()
                await call.done_writing()
                i += 1
                if start_at <= time.time() < end_at:
                    completed += 1

        await asyncio.gather(*(loop(stub, k) for k, stub in enumerate(stubs) for _ in range(streams)))
        for c in channels:
            await c.close()
        return completed

    completed = asyncio.run(main())
    usage = os.times()
    print(json.dumps({"completed": completed, "cpu_seconds": usage.user + usage.system}))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--client":
        _client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
