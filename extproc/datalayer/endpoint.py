"""What the picker knows of one endpoint, and which part of the process writes each figure."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STALE_AFTER = 2.0  # seconds; the `scrape.stale_after` default


@dataclass(slots=True)
class EndpointState:
    """One endpoint (a vLLM pod, ``ip:port``) of one pool, as the request path reads it.

    Every field has one writer; the request path only reads, except for ``pending``.

    ============  ===============================  ==================================================
    field         written by                       meaning
    ============  ===============================  ==================================================
    address,      the table (discovery)            identity; an address in two pools has two states
    pool
    stale_after   the table, from scrape config    how old a scrape may be and still be trusted
    waiting,      the scraper                      vLLM's queue, batch and KV-cache use (0..1) as of
    running,                                       the latest good scrape
    kv_usage
    cache_tokens  the scraper                      KV-cache capacity in tokens (vllm:cache_config_info;
                                                   None until known)
    scraped_at    the scraper                      when that scrape finished (monotonic s; None =
                                                   never)
    scrape_ok     the scraper                      whether the most recent attempt succeeded
    pending       scheduler (+1 per pick),         requests sent there since the latest scrape, so a
                  scraper (back to 0)              burst between two scrapes does not bunch up
    ============  ===============================  ==================================================
    """

    address: str
    pool: str
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float | None = None
    scrape_ok: bool = False
    pending: int = 0
    stale_after: float = DEFAULT_STALE_AFTER
    cache_tokens: int | None = None

    def scraped(self, waiting: float, running: float, kv_usage: float, cache_tokens: int | None, at: float) -> None:
        """A good scrape finished ``at`` (this replica's, or another's shared through ``state``): its figures
        replace the old ones and the picks counted since the previous scrape are in them now."""
        self.waiting = waiting
        self.running = running
        self.kv_usage = kv_usage
        self.cache_tokens = cache_tokens
        self.scraped_at = at
        self.scrape_ok = True
        self.pending = 0

    def fresh(self, now: float) -> bool:
        """The latest scrape succeeded and is at most ``stale_after`` seconds old at ``now``."""
        return self.scrape_ok and self.scraped_at is not None and now - self.scraped_at <= self.stale_after
