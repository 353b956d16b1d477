"""Configuration keys that moved: still accepted, moved to their new place, with a warning that names it.

Plugin settings now live with the plugin that uses them (``scheduler.filters[...].params``,
``scheduler.scorers[...].params``). Files written for the earlier layout keep working; each old key is
rewritten into the raw data before validation, so the new place's checks (and error messages) apply.
Params already given in the new place win over a moved key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger("extproc.config")

SATURATION_FILTER = "not_saturated"
PREFIX_SCORER = "prefix"


def _moved(old: Sequence[str], kind: str, plugin: str, params: dict[str, Any], applied: bool) -> None:
    given = ", ".join(f"{key}: {json.dumps(value)}" for key, value in params.items())
    new = f"scheduler.{kind}s: [..., {{name: {plugin}, params: {{{given}}}}}]"
    keys = " and ".join(f"'{key}'" for key in old)
    if applied:
        log.warning("configuration: %s moved to the %s %s; write %s (applied there this time)", keys, plugin, kind, new)
    else:
        log.warning("configuration: %s moved to the %s %s, which is not configured: no effect", keys, plugin, kind)


def _merge_params(entries: Iterable[Any], name: str, params: dict[str, Any]) -> tuple[list[Any], bool]:
    """``entries`` with ``params`` added to every plugin entry named ``name``; and whether there was one."""
    out: list[Any] = []
    found = False
    for entry in entries:
        spec = {"name": entry} if isinstance(entry, str) else entry
        if isinstance(spec, dict) and spec.get("name") == name:
            found = True
            given = spec.get("params")
            spec = {**spec, "params": {**params, **(given if isinstance(given, dict) else {})}}
        out.append(spec)
    return out, found


def move_saturation(scheduler: dict[str, Any], default_filters: Sequence[str]) -> dict[str, Any]:
    """``scheduler.saturation`` and ``scheduler.shed_when_saturated`` -> the ``not_saturated`` filter's params."""
    if "saturation" not in scheduler and "shed_when_saturated" not in scheduler:
        return scheduler
    data = dict(scheduler)
    params: dict[str, Any] = {}
    old: list[str] = []
    if "saturation" in data:
        saturation = data.pop("saturation")
        if not isinstance(saturation, dict):
            raise ValueError(
                "'saturation' must be a mapping (queue_threshold, kv_cache_threshold); "
                f"better, give them as params of the {SATURATION_FILTER} filter"
            )
        params.update(saturation)
        old.append("scheduler.saturation")
    if "shed_when_saturated" in data:
        params["shed"] = data.pop("shed_when_saturated")
        old.append("scheduler.shed_when_saturated")
    filters = data.get("filters", list(default_filters))
    if isinstance(filters, list | tuple):
        data["filters"], found = _merge_params(filters, SATURATION_FILTER, params)
        _moved(old, "filter", SATURATION_FILTER, params, found)
    return data


def move_prefix(config: dict[str, Any], default_scorers: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """The top-level ``prefix`` section -> the ``prefix`` scorer's params."""
    if "prefix" not in config:
        return config
    data = dict(config)
    prefix = data.pop("prefix")
    if not isinstance(prefix, dict):
        raise ValueError(
            "'prefix' must be a mapping (block_chars, max_blocks, max_prompt_blocks); "
            f"better, give them as params of the {PREFIX_SCORER} scorer"
        )
    scheduler = data.get("scheduler")
    scheduler = dict(scheduler) if isinstance(scheduler, dict) else {}
    scorers = scheduler.get("scorers", [{"name": n, "weight": w} for n, w in default_scorers])
    if not isinstance(scorers, list | tuple):
        return data
    scheduler["scorers"], found = _merge_params(scorers, PREFIX_SCORER, prefix)
    data["scheduler"] = scheduler
    _moved(["prefix"], "scorer", PREFIX_SCORER, prefix, found)
    return data
