"""The routers compared, and each one started in front of fresh simulators, as a user would start it.

The project's gateway is Envoy plus `extproc serve`, started by `extproc.local.stack.start_stack` exactly as
`extproc bench routing` and `extproc up` start it (the configuration's defaults, the scrape interval too). The
peers are the PyPI routers' own command lines with their default settings, only bound to 127.0.0.1 on free
ports and given the simulators' URLs: what a user evaluating them would run.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from extproc.bench.peers.cpu import tree_seconds
from extproc.bench.routing.plan import POLICIES
from extproc.bench.routing.switch import post
from extproc.bench.workloads import MODEL
from extproc.local.procs import Child, SimStart, free_port, free_port_blocks, start_sims
from extproc.names import PICKED_HEADER

if TYPE_CHECKING:
    from extproc.local.stack import Stack

INSTALL_HINT = "pip install -e '.[peers]'"
PROGRAMS = {"sglang": "sglang-router", "vllm": "vllm-router"}  # kind -> the PyPI package's command


@dataclass(frozen=True)
class RouterSpec:
    name: str
    kind: str  # "extproc", "sglang" or "vllm"
    policy: str  # the peer's --policy; for the gateway, a label
    scheduler: dict[str, Any] | None = None  # the gateway's scheduler section (None: the configuration's default)
    settings: dict[str, Any] | None = None  # other top-level sections for this gateway alone (e.g. scrape)
    pickers: int = 1  # `extproc serve` replicas behind the one Envoy (its ext_proc cluster holds them all)
    shared: bool = False  # the pickers share their picks through a redis-server of their own
    workers: int = 1  # `extproc serve --workers N` processes per picker (on one port)
    kv_events: bool = False  # its simulators publish vLLM KV-cache events (for precise_prefix)


ROUTERS: dict[str, RouterSpec] = {
    s.name: s
    for s in (
        RouterSpec("extproc", "extproc", "default"),
        RouterSpec("extproc-rr", "extproc", "round_robin", POLICIES["round_robin"]),
        RouterSpec("sglang-cache_aware", "sglang", "cache_aware"),
        RouterSpec("sglang-round_robin", "sglang", "round_robin"),
        RouterSpec("sglang-power_of_two", "sglang", "power_of_two"),
        RouterSpec("vllm-cache_aware", "vllm", "cache_aware"),
        RouterSpec("vllm-round_robin", "vllm", "round_robin"),
        RouterSpec("extproc-x2", "extproc", "default, 2 pickers", pickers=2),
        RouterSpec("extproc-x2-redis", "extproc", "default, 2 pickers on Redis", pickers=2, shared=True),
        RouterSpec("extproc-w2-redis", "extproc", "default, serve --workers 2 on Redis", workers=2, shared=True),
        RouterSpec("extproc-precise", "extproc", "precise_prefix", POLICIES["precise"], kv_events=True),
        RouterSpec(
            "extproc-x2-precise", "extproc", "precise_prefix, 2 pickers", POLICIES["precise"], pickers=2, kv_events=True
        ),
    )
}
PEER_ROUTERS = tuple(n for n in ROUTERS if not n.startswith("extproc-x") and "precise" not in n)  # `bench peers`
QUICK_ROUTERS = ("extproc", "extproc-rr", "sglang-cache_aware", "sglang-round_robin")
REPLICA_ROUTERS = ("extproc", "extproc-x2", "extproc-x2-redis", "extproc-w2-redis")  # `bench replicas`


def find_program(kind: str, override: str | None = None) -> str | None:
    """The peer's command: ``override``, else the one installed beside this interpreter, else on PATH."""
    if override:
        return override if os.access(override, os.X_OK) else None
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(PROGRAMS[kind], path=search)


@dataclass(frozen=True)
class SimSetup:
    """The replicas every router gets, fresh for each cell."""

    replicas: int = 4
    preset: str = "llama-3.2-1b"
    num_gpu_blocks: int = 1000
    time_scale: float = 1.0
    seed: int = 1

    def args(self) -> tuple[str, ...]:
        return (
            "--preset", self.preset, "--num-gpu-blocks", str(self.num_gpu_blocks),
            "--time-scale", str(self.time_scale), "--seed", str(self.seed),
        )  # fmt: skip


@dataclass
class Running:
    """One router up in front of its own simulators; ``stop`` ends every process of both, by PID."""

    spec: RouterSpec
    url: str  # where clients send: http://127.0.0.1:PORT
    sims: list[Child]
    bases: list[str]  # the simulators' base URLs
    parts: dict[str, Child]  # the router's processes by role, for CPU accounting and logs
    stack: Stack | None = None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each router part, and of all replicas together (``replicas``)."""
        roots = {name: [child.pid] for name, child in self.parts.items()}
        return tree_seconds({**roots, "replicas": [c.pid for c in self.sims]})

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        for child in [*self.parts.values(), *self.sims]:
            child.stop()


def _healthy_workers(url: str) -> int:
    """Workers the peer has registered and found healthy (``GET /workers``: 200 even before there are any,
    unlike ``/readiness``, whose 503s the peer would log as errors)."""
    try:
        with urllib.request.urlopen(f"{url}/workers", timeout=2) as response:
            return sum(bool(w.get("is_healthy")) for w in orjson.loads(response.read()).get("workers", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


# A prompt shorter than one KV block: it leaves nothing in any replica's prefix cache.
PROBE = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})


def _wait(what: str, ready: Callable[[], bool], watch: Sequence[Child], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for child in watch:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in watch)
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{tails}")
        time.sleep(0.05)


def _start_gateway(spec: RouterSpec, setup: SimSetup, log_dir: Path, settings: dict[str, Any]) -> Running:
    from extproc.local.stack import PoolSpec, start_stack  # the configuration's pydantic models: only when needed

    settings = {**settings, **(spec.settings or {})}
    if spec.scheduler is not None:
        settings = {**settings, "scheduler": spec.scheduler}
    redis = None
    if spec.shared:
        from extproc.local.redis import start_redis

        redis, url = start_redis(log_dir)
        settings = {**settings, "state": {**settings.get("state", {}), "backend": "redis", "url": url}}
    try:
        pools = [PoolSpec("bench", MODEL, setup.replicas, setup.args(), kv_events=spec.kv_events)]
        stack = start_stack(log_dir, pools, settings=settings, pickers=spec.pickers, workers=spec.workers)
    except BaseException:
        if redis is not None:
            redis.stop()
        raise
    if redis is not None:
        stack.extras.append(redis)
    assert stack.envoy is not None and stack.extproc is not None
    replicas = stack.sims["bench"]
    parts = {"envoy": stack.envoy, "picker": stack.extproc}
    parts.update({f"picker-{i}": child for i, child in enumerate(stack.more_pickers, start=2)})
    if redis is not None:
        parts["redis"] = redis
    running = Running(spec, stack.gateway, [r.child for r in replicas], [r.base for r in replicas], parts, stack)

    def picked() -> bool:  # the picker answers through Envoy once it has scraped the pool
        status, headers = post(f"{stack.gateway}/v1/chat/completions", PROBE)
        return status == 200 and headers.get(PICKED_HEADER, "-") not in ("", "-")

    try:
        _wait(spec.name, picked, [stack.envoy, *stack.pickers])
    except BaseException:
        running.stop()
        raise
    return running


def _peer_argv(spec: RouterSpec, program: str, port: int, bases: Sequence[str]) -> list[str]:
    launch = ["launch"] if spec.kind == "sglang" else []  # `sglang-router launch`, `vllm-router`
    return [
        program, *launch, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *bases,
        "--policy", spec.policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
    ]  # fmt: skip


def _start_peer(spec: RouterSpec, setup: SimSetup, log_dir: Path, program: str) -> Running:
    sims: list[Child] = []
    try:
        ports = free_port_blocks(setup.replicas)
        sims = start_sims([SimStart(f"sim-bench-{i}", MODEL, p, setup.args()) for i, p in enumerate(ports)], log_dir)
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        port = free_port()
        router = Child(spec.name, _peer_argv(spec, program, port, bases), log_dir)
    except BaseException:
        for child in sims:
            child.stop()
        raise
    url = f"http://127.0.0.1:{port}"
    running = Running(spec, url, sims, bases, {"router": router})
    try:
        # Peers register workers in the background after they listen: wait for all, then for an answer.
        _wait(spec.name, lambda: _healthy_workers(url) == setup.replicas, [router])
        _wait(spec.name, lambda: post(f"{url}/v1/chat/completions", PROBE)[0] == 200, [router])
    except BaseException:
        running.stop()
        raise
    return running


def start_router(
    spec: RouterSpec, setup: SimSetup, log_dir: Path, programs: dict[str, str], settings: dict[str, Any]
) -> Running:
    """``spec`` in front of ``setup.replicas`` new simulators, ready for traffic (one probe answered)."""
    if spec.kind == "extproc":
        return _start_gateway(spec, setup, log_dir, settings)
    return _start_peer(spec, setup, log_dir, programs[spec.kind])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"\b(ERROR|WARN|WARNING|CRITICAL)\b")


def log_problems(paths: Sequence[Path]) -> dict[str, Any]:
    """Lines logged at warning level or above by a router's processes: all of them, and those naming rendering."""
    errors, render, sample = 0, 0, []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for raw in lines:
            line = _ANSI.sub("", raw)
            level = _LEVEL.search(line)
            if level is None:
                continue
            errors += level.group(1) in ("ERROR", "CRITICAL")
            if "render" in line.lower() or "tokeniz" in line.lower():
                render += 1
                if len(sample) < 3:
                    sample.append(line[-300:])
    return {"error_lines": errors, "render_lines": render, "render_sample": sample}
