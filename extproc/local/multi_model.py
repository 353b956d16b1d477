"""The write-up's multi-model gateway, defined once: what `extproc up` runs and what `extproc demo` sends traffic to.

Two pools of two simulated replicas each (``1b``: Llama-3.2-1B, ``3b``: Llama-3.2-3B), routed by path
(``/v1/1b/...``, ``/v1/3b/...``) and by the body's ``model``, plus the A/B split ``/v1/ab-test/...``: 70% to
``1b``, 30% to ``3b``, sticky on ``x-user-id``. One definition, so the write-up's ``curl`` commands answer the
same against either command.
"""

from __future__ import annotations

from typing import Any

from extproc.local.stack import PoolSpec

POOLS = (
    PoolSpec("1b", "llama-3-2-1b", 2, ("--preset", "llama-3.2-1b")),
    PoolSpec("3b", "llama-3-2-3b", 2, ("--preset", "llama-3.2-3b")),
)

AB_ROUTE = "ab-test"
AB_WEIGHTS = {"1b": 70, "3b": 30}
STICKY_HEADER = "x-user-id"
SPLIT_SETTINGS: dict[str, Any] = {
    "splits": [
        {
            "name": AB_ROUTE,
            "backends": [{"pool": pool, "weight": weight} for pool, weight in AB_WEIGHTS.items()],
            "sticky_header": STICKY_HEADER,
        }
    ]
}
