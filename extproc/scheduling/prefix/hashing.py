"""Prompt text -> chained block hashes: how the prefix plugin names what an endpoint has cached.

vLLM can only reuse a KV-cache block if every block before it matches too, so prompts are cut into
blocks and hashed *chained* (each block's hash is seeded with the previous one): equal hash i means equal
text up to the end of block i. Blocks are counted in characters (about four per token), as GIE does.
"""

from __future__ import annotations

from functools import lru_cache

import xxhash

_hash = xxhash.xxh3_64_intdigest


@lru_cache(maxsize=1024)
def model_seed(model: str) -> int:
    """The seed of a model's hash chain, so that the same text for two models never matches."""
    return _hash(model.encode())


def prompt_hashes(text: str, model: str, block_chars: int = 64, max_blocks: int = 256) -> tuple[int, ...]:
    """Chained xxh3-64 hashes of the leading ``block_chars``-character blocks of ``text``.

    Only full blocks are hashed, as in GIE and vLLM: a trailing partial block changes with every
    extra character, so it would never match a longer follow-up prompt. The one exception is a prompt
    shorter than one block: it gets one hash of all of it, so that identical short prompts can still
    be matched (the prefix scorer gives such a match little weight, see ``scorer.PrefixScorer``).
    At most ``max_blocks`` leading blocks are hashed; an empty text has no hashes.

    Blocks are counted in characters, not bytes; ASCII text (the common case) is hashed as slices
    of its UTF-8 encoding, other text block by block.
    """
    if not text:
        return ()
    seed = model_seed(model)
    data = text.encode()
    full = min(len(text) // block_chars, max_blocks)
    if full == 0:
        return (_hash(data, seed),)
    end = full * block_chars
    out: list[int] = []
    append = out.append
    h = seed
    if len(data) == len(text):  # ASCII: byte offsets are character offsets
        for start in range(0, end, block_chars):
            h = _hash(data[start : start + block_chars], h)
            append(h)
    else:
        for start in range(0, end, block_chars):
            h = _hash(text[start : start + block_chars].encode(), h)
            append(h)
    return tuple(out)
