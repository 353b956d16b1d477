"""A Redis client for ``state:``: one server, a Cluster or a Sentinel-watched primary, with or without TLS.

Secrets never come from the configuration file: the password is read from ``password_file`` or the
environment variable ``password_env`` when the client is made (an unreadable file is an error naming the field;
an unset variable means no password, with a warning, so an optional Kubernetes Secret may be left out).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from extproc.config import ConfigError, State, parse_host_port

log = logging.getLogger(__name__)


def password(state: State) -> str | None:
    """The password from ``password_file`` (its first line) or ``password_env``, or None when neither is set."""
    if state.password_file:
        try:
            lines = Path(state.password_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"state.password_file: cannot read {state.password_file!r}: {exc.strerror}") from None
        return lines[0] if lines else ""
    if state.password_env:
        value = os.environ.get(state.password_env)
        if not value:  # e.g. an optional Secret that was never created: say so, and try without
            log.warning(
                "state.password_env: %s is not set or empty: connecting to Redis without a password", state.password_env
            )
            return None
        return value
    return None


def client(state: State) -> Any:
    """A client for ``state.url``: ``redis.asyncio.Redis`` or ``RedisCluster`` (the same commands)."""
    assert state.url is not None
    scheme, _, rest = state.url.partition("://")
    tls = scheme.startswith("rediss")
    options: dict[str, Any] = {
        "username": state.username,
        "password": password(state),
        "socket_timeout": state.timeout,
        "socket_connect_timeout": state.timeout,
    }
    if tls and state.ca_file:
        options["ssl_ca_certs"] = state.ca_file
    if scheme.endswith("+cluster"):
        base = ("rediss" if tls else "redis") + "://" + rest
        return RedisCluster.from_url(base, **options)
    if scheme.endswith("+sentinel"):
        return _sentinel_primary(rest, tls, options)
    return aioredis.Redis.from_url(state.url, **options)


def _sentinel_primary(rest: str, tls: bool, options: dict[str, Any]) -> Any:
    """``host:port,host:port/MASTER[/db]``: the current primary of MASTER, found (and re-found) by Sentinel."""
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(
            "state.url: a Sentinel URL is redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB], "
            f"got '...://{rest}'"
        )
    try:
        sentinels = [parse_host_port(h, "sentinel") for h in hosts.split(",")]
    except ValueError as exc:
        raise ConfigError(f"state.url: {exc}") from None
    if tls:
        options = {**options, "ssl": True}
    sentinel_options = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options, **options)
    db = int(parts[1]) if len(parts) == 2 else 0
    return sentinel.master_for(parts[0], db=db)
