"""Envoy EDS files for the pools, so a membership change reaches Envoy without a restart.

With ``server.eds_dir`` set, the picker writes one file per pool whenever that pool's endpoints change
(config reload or DNS), and the generated Envoy bootstrap reads the pool clusters from those files
(``path_config_source`` with a watched directory). Files are replaced atomically (write, then rename),
which is how Envoy's file watcher expects them to change.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

from extproc.config import parse_host_port
from extproc.names import CLUSTER_PREFIX

ASSIGNMENT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def eds_path(eds_dir: str | Path, pool: str) -> Path:
    return Path(eds_dir) / f"{CLUSTER_PREFIX}{pool}.json"


def load_assignment(pool: str, addresses: Iterable[str]) -> dict[str, object]:
    endpoints = []
    for address in sorted(addresses):
        host, port = parse_host_port(address, "endpoint")
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}})
    return {
        "version_info": str(zlib.crc32(",".join(sorted(addresses)).encode())),
        "resources": [
            {
                "@type": ASSIGNMENT_TYPE,
                "cluster_name": f"{CLUSTER_PREFIX}{pool}",
                "endpoints": [{"lb_endpoints": endpoints}] if endpoints else [],
            }
        ],
    }


def write_eds(eds_dir: str | Path, pool: str, addresses: Iterable[str]) -> Path:
    """Atomically replace the pool's EDS file with ``addresses``."""
    path = eds_path(eds_dir, pool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(load_assignment(pool, list(addresses)), indent=1))
    os.replace(tmp, path)
    return path
