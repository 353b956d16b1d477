"""The wire format of shared picks: one Redis stream entry holds a batch of them.

A batch is what one replica picked during one publish interval, oldest first; each pick names its pool and
endpoint, and carries what each sharing plugin recorded (its kind and its own encoding). Everything is
length-prefixed, so a reader can skip a plugin kind it does not know, and a truncated or foreign entry is
detected instead of misread::

    batch  := u8 version | u32 picks | pick*
    pick   := u16 len | pool | u16 len | address | u8 records | record*
    record := u8 len | kind | u32 len | payload

Replicas also share what they scraped (``state.share_scrapes``), so an endpoint is scraped by one replica
rather than by all of them; an entry's loads are a separate field::

    loads  := u8 version | u16 count | load*
    load   := u16 len | address | f64 waiting | f64 running | f64 kv_usage | i64 cache_tokens (-1: unknown)
              | f64 scraped (wall clock)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

VERSION = 1
_HEAD = struct.Struct("<BI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

_LOAD = struct.Struct("<dddqd")

Pick = tuple[str, str, list[tuple[str, bytes]]]  # pool, address, [(kind, payload)]


class Load(NamedTuple):
    """One scrape's figures, as another replica applies them."""

    address: str
    waiting: float
    running: float
    kv_usage: float
    cache_tokens: int | None
    scraped: float  # wall clock (time.time) when the scrape finished


def encode_loads(loads: Sequence[Load]) -> bytes:
    out = [_U8.pack(VERSION), _U16.pack(len(loads))]
    for load in loads:
        raw = load.address.encode()
        tokens = -1 if load.cache_tokens is None else load.cache_tokens
        out += (_U16.pack(len(raw)), raw, _LOAD.pack(load.waiting, load.running, load.kv_usage, tokens, load.scraped))
    return b"".join(out)


def decode_loads(data: bytes) -> list[Load]:
    """The loads of an entry; ValueError if they are not (another version, truncated, non-finite figures)."""
    view = memoryview(data)
    try:
        (version,) = _U8.unpack_from(view, 0)
        if version != VERSION:
            raise ValueError(f"loads version {version}, expected {VERSION}")
        (count,) = _U16.unpack_from(view, 1)
        at = 3
        loads = []
        for _ in range(count):
            (n,) = _U16.unpack_from(view, at)
            address = _text(view, at + 2, n)
            at += 2 + n
            waiting, running, kv_usage, tokens, scraped = _LOAD.unpack_from(view, at)
            at += _LOAD.size
            if not all(math.isfinite(x) and x >= 0 for x in (waiting, running, kv_usage, scraped)):
                raise ValueError("a load figure is negative or not finite")
            loads.append(Load(address, waiting, running, kv_usage, None if tokens < 0 else tokens, scraped))
    except struct.error as exc:
        raise ValueError(f"truncated loads: {exc}") from None
    if at != len(view):
        raise ValueError(f"{len(view) - at} bytes after the last load")
    return loads


def encode_batch(picks: Sequence[Pick]) -> bytes:
    out = [_HEAD.pack(VERSION, len(picks))]
    for pool, address, records in picks:
        for text in (pool, address):
            raw = text.encode()
            out += (_U16.pack(len(raw)), raw)
        out.append(_U8.pack(len(records)))
        for kind, payload in records:
            raw = kind.encode()
            out += (_U8.pack(len(raw)), raw, _U32.pack(len(payload)), payload)
    return b"".join(out)


def decode_batch(data: bytes) -> list[Pick]:
    """The picks of a batch; ValueError if it is not one (another version, truncated, trailing bytes)."""
    view = memoryview(data)
    try:
        version, count = _HEAD.unpack_from(view, 0)
        if version != VERSION:
            raise ValueError(f"batch version {version}, expected {VERSION}")
        at = _HEAD.size
        picks: list[Pick] = []
        for _ in range(count):
            (n,) = _U16.unpack_from(view, at)
            pool = _text(view, at + 2, n)
            at += 2 + n
            (n,) = _U16.unpack_from(view, at)
            address = _text(view, at + 2, n)
            at += 2 + n
            (records_count,) = _U8.unpack_from(view, at)
            at += 1
            records = []
            for _ in range(records_count):
                (n,) = _U8.unpack_from(view, at)
                kind = _text(view, at + 1, n)
                at += 1 + n
                (n,) = _U32.unpack_from(view, at)
                if at + 4 + n > len(view):
                    raise ValueError("a record runs past the end of the batch")
                records.append((kind, bytes(view[at + 4 : at + 4 + n])))
                at += 4 + n
            picks.append((pool, address, records))
    except struct.error as exc:
        raise ValueError(f"truncated batch: {exc}") from None
    if at != len(view):
        raise ValueError(f"{len(view) - at} bytes after the last pick")
    return picks


def _text(view: memoryview, at: int, n: int) -> str:
    if at + n > len(view):
        raise ValueError("a name runs past the end of the batch")
    try:
        return bytes(view[at : at + n]).decode()
    except UnicodeDecodeError:
        raise ValueError("a name is not UTF-8") from None
