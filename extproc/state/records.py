"""The wire format of shared picks: one Redis stream entry holds a batch of them.

A batch is what one replica picked during one publish interval, oldest first; each pick names its pool and
endpoint, and carries what each sharing plugin recorded (its kind and its own encoding). Everything is
length-prefixed, so a reader can skip a plugin kind it does not know, and a truncated or foreign entry is
detected instead of misread::

    batch  := u8 version | u32 picks | pick*
    pick   := u16 len | pool | u16 len | address | u8 records | record*
    record := u8 len | kind | u32 len | payload
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

VERSION = 1
_HEAD = struct.Struct("<BI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

Pick = tuple[str, str, list[tuple[str, bytes]]]  # pool, address, [(kind, payload)]


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
