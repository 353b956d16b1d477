"""The values the scheduling core works on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EndpointState:
    """What the picker knows of one endpoint (a vLLM pod, ``ip:port``) right now.

    ``waiting``, ``running`` and ``kv_usage`` come from the endpoint's latest good scrape;
    ``scraped_at`` is when that scrape finished (monotonic seconds, None = never);
    ``scrape_ok`` is whether the most recent scrape attempt succeeded; ``pending`` counts the
    requests this picker sent there since that scrape, so that a burst between two scrapes does not
    all land on the same endpoint.
    """

    address: str
    pool: str
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float | None = None
    scrape_ok: bool = False
    pending: int = 0

    def fresh(self, now: float, stale_after: float) -> bool:
        return self.scrape_ok and self.scraped_at is not None and now - self.scraped_at <= stale_after


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """One inference request, as the scheduler needs it.

    ``prefix_hashes`` are the chained hashes of the rendered prompt's blocks (empty for a request
    without a body); ``subset`` is the GIE candidate-subset hint, None when absent.
    """

    pool: str
    model: str | None = None
    prefix_hashes: tuple[int, ...] = ()
    prompt_chars: int = 0
    subset: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: endpoints in order (pick first), or a refusal with its HTTP status and reason."""

    endpoints: tuple[str, ...] = ()
    status: int = 200  # 200 = routed; 503 = nothing to route to; 429 = shed under saturation
    reason: str = ""
    fail_open: bool = False  # a filter left nothing and was bypassed (e.g. every endpoint stale)
    scores: dict[str, float] = field(default_factory=dict)
    prompt_blocks: int = 0  # the prompt's blocks, when a prefix scorer looked them up (else 0)
    matched_blocks: int = 0  # of those, how many the index placed on the pick

    @property
    def routed(self) -> bool:
        return self.status == 200 and bool(self.endpoints)
