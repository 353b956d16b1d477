"""A real Prometheus beside the local stack, scraping Envoy, the picker and every simulator.

The picker, Envoy and the simulators each expose Prometheus text; a real server shows them as a time
series (rates, histograms, the Grafana dashboards) instead of one snapshot, and proves the names and
labels work in PromQL. Prometheus is an external binary, found on PATH or through ``$EXTPROC_PROMETHEUS``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.local.procs import Child, free_port
from extproc.local.stack import Stack, local_address

ENV_VAR = "EXTPROC_PROMETHEUS"
INSTALL_HINT = (
    "Install it: on Debian/Ubuntu `sudo apt-get install prometheus`; elsewhere download the release tarball "
    f"from https://prometheus.io/download/ and put its `prometheus` binary on PATH or set {ENV_VAR}=/path/to/prometheus"
)

# Requests go to 127.0.0.1 only: never through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusMissing(RuntimeError):
    """No Prometheus binary: the message says how to install one."""


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered with an error."""


def find_prometheus() -> str:
    """The ``prometheus`` binary: ``$EXTPROC_PROMETHEUS`` (a path or a name on PATH) if set, else PATH."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise PrometheusMissing(f"{ENV_VAR}={configured!r} is not an executable file. {INSTALL_HINT}")
        return found
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusMissing(f"no `prometheus` binary on PATH. {INSTALL_HINT}")
    return found


def _duration(seconds: float) -> str:
    """A Prometheus duration: it takes integers with a unit only ("1s", "500ms"), never "0.5s"."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"scrape interval must be at least 1 ms, not {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _model_servers(stack: Stack) -> list[dict[str, Any]]:
    """The ``vllm`` job's target groups, one per pool: the simulators the stack started or, for a user's own file
    (`extproc up --config`), its pools' static endpoints at their metrics port and path. DNS pools are left out:
    Prometheus would need the same name resolved, which only the picker does here."""
    if stack.sims:
        return [{"targets": [r.address for r in rs], "labels": {"pool": pool}} for pool, rs in stack.sims.items()]
    groups = []
    for pool in stack.config.pools:
        if not pool.endpoints.static:
            continue
        targets = [f"{a.rsplit(':', 1)[0]}:{pool.metrics.port or a.rsplit(':', 1)[1]}" for a in pool.endpoints.static]
        labels = {"pool": pool.name}
        if pool.metrics.path != "/metrics":
            labels["__metrics_path__"] = pool.metrics.path  # Prometheus's per-target path
        groups.append({"targets": targets, "labels": labels})
    return groups


def scrape_config(stack: Stack, scrape_interval: float = 1.0) -> dict[str, Any]:
    """Prometheus's configuration for ``stack``: jobs ``envoy``, ``extproc`` and ``vllm`` (a ``pool`` label each).

    The interval is short (1 s) because the local stack lives for seconds to minutes, not days.
    """
    interval = _duration(scrape_interval)
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{stack.admin_port}"]}],
            },
            {
                "job_name": "extproc",
                "static_configs": [  # every picker of the stack (start_stack(pickers=N))
                    {"targets": [local_address(c.server.metrics_listen) for c in stack.picker_configs]}
                ],
            },
            {
                "job_name": "vllm",
                "static_configs": _model_servers(stack),
            },
        ],
    }


@dataclass
class Prometheus:
    """A running Prometheus and small synchronous clients of its HTTP API, for the demo and the tests."""

    child: Child
    port: int
    scrape_interval: float = 1.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.child.stop()

    def describe(self, stack: Stack) -> str:
        """One line for the demo and ``up``: where it is and what it scrapes."""
        servers = sum(len(group["targets"]) for group in _model_servers(stack))
        kind = "simulators" if stack.sims else "model servers"
        return (
            f"Prometheus: http://localhost:{self.port} (scrapes Envoy, the picker and {servers} {kind} "
            f"every {self.scrape_interval:g} s); Grafana dashboards: see docs/dashboards.md"
        )

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET an /api/v1 path; its ``data``, or PrometheusError with Prometheus's own error message."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with _OPENER.open(url, timeout=10.0) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:  # 400/422/503 still carry the JSON error
            body = exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} did not answer {path}: {exc}") from exc
        try:
            answer = json.loads(body)
        except ValueError as exc:
            raise PrometheusError(f"Prometheus answered {path} with something not JSON: {body[:200]!r}") from exc
        if answer.get("status") != "success":
            what = f"query {params['query']!r}" if params and "query" in params else path
            raise PrometheusError(
                f"Prometheus refused {what}: {answer.get('errorType', '?')}: {answer.get('error', 'no message')}"
            )
        return answer.get("data")

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {labels}, "value": [ts, "value"]}, ...]``.

        A scalar or string result comes back as one entry with no labels, so callers handle one shape.
        """
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._api("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with ``labels``, ``scrapeUrl``, ``health`` and ``lastError``."""
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every active target's last scrape succeeded; else list the ones that did not, and why."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise PrometheusError(f"prometheus exited with {self.child.proc.returncode}:\n{self.child.log_tail()}")
            targets = self.targets()
            down = [t for t in targets if t.get("health") != "up"]
            if targets and not down:
                return targets
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if not targets:
            raise PrometheusError(f"Prometheus at {self.url} has no active targets after {timeout:g} s")
        lines = [
            f"  {t['labels'].get('job', '?')} {t.get('scrapeUrl', '?')}: {t.get('health')}"
            f" ({t.get('lastError') or 'not scraped yet'})"
            for t in down
        ]
        raise PrometheusError(
            f"{len(down)} of {len(targets)} Prometheus targets not up after {timeout:g} s:\n" + "\n".join(lines)
        )


def start_prometheus(
    stack: Stack,
    log_dir: Path,
    port: int | None = None,
    scrape_interval: float = 1.0,
    ready_timeout: float = 30.0,
) -> Prometheus:
    """Start Prometheus for ``stack`` on 127.0.0.1 and wait until it is ready; ``stack.stop()`` stops it too.

    Its data goes to a fresh folder under ``log_dir`` (kept a day at most), so runs never mix their series.
    """
    binary = find_prometheus()
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(stack, scrape_interval), sort_keys=False))
    data_dir = tempfile.mkdtemp(prefix="prometheus-data-", dir=log_dir)
    port = port or free_port()
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",  # startup chatter and scrape details stay out of the log; failures still show
    ]
    child = Child("prometheus", argv, log_dir)
    try:
        child.wait_http(f"http://127.0.0.1:{port}/-/ready", ready_timeout)
    except RuntimeError as exc:
        child.stop()
        raise PrometheusError(str(exc)) from exc
    except BaseException:
        child.stop()
        raise
    stack.extras.append(child)
    return Prometheus(child, port, scrape_interval)
