"""What goes into the scheduler and what comes out (the endpoints' states come from the data layer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """One inference request, as the scheduler needs it.

    ``prompt`` is the request's prompt rendered in prefix order ("" without a body): plugins that need
    more than the text (block hashes, tokens) derive it themselves, only when configured.
    ``target_model`` is the model the pool serves the request with (it seeds prefix hashes, so the same
    text for two models never matches); ``subset`` is the GIE candidate-subset hint, None when absent;
    ``token_ids`` the engine's tokens of the prompt, only when a plugin asks for them (``needs_tokens``).
    """

    pool: str
    model: str | None = None  # the model the client asked for; None for "any" (auto, or no body)
    prompt: str = ""
    subset: frozenset[str] | None = None
    target_model: str = ""
    token_ids: Sequence[int] | None = None  # the prompt as the engine tokenizes it, when a plugin needs it


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: endpoints in order (pick first), or a refusal with its HTTP status and reason."""

    endpoints: tuple[str, ...] = ()
    status: int = 200  # 200 = routed; 503 = nothing to route to; 429 = shed under saturation
    reason: str = ""
    fail_open: bool = False  # a filter left nothing and was bypassed (e.g. every endpoint stale)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def routed(self) -> bool:
        return self.status == 200 and bool(self.endpoints)
