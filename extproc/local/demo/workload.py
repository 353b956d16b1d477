"""The demo's workload: the requests of the write-up's three scenarios, and conversations that remember their turns.

Shared system prompts and growing multi-turn histories are what vLLM's prefix cache exists for and what
the picker's prefix scorer routes by, so the load test is made of them.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.local.multi_model import AB_ROUTE, AB_WEIGHTS, STICKY_HEADER

PHASE_SHARES = (("path-routing", 0.15), ("ab-split", 0.25), ("load-test", 0.60))

_TENANTS = (
    ("Acme Retail", "order tracking, returns and loyalty points", "a friendly, concise"),
    ("Globex Bank", "card disputes, transfers and account security", "a precise, formal"),
    ("Initech Cloud", "billing, quotas and incident status", "a patient, technical"),
)
_TOPICS = (
    "identity verification",
    "refund windows",
    "escalation to a human agent",
    "personal data",
    "service hours",
    "tone and language",
    "links and attachments",
    "outages and incidents",
    "pricing questions",
    "complaints",
    "accessibility",
    "legal requests",
)
_QUESTIONS = (
    "Where is my latest order and when will it arrive?",
    "I was charged twice this month, can you check what happened?",
    "How do I reset my password without access to my old phone?",
    "Can I change the delivery address of an order that has already shipped?",
    "What does the error message 'quota exceeded' mean for my account?",
    "Please summarise what we discussed so far in two sentences.",
    "Is there an ongoing incident affecting the European region?",
    "How many loyalty points do I need for free shipping?",
)


def system_prompt(tenant: int) -> str:
    """A tenant's long system prompt (~2 KB, ~500 tokens): every conversation of the tenant starts with it."""
    name, scope, voice = _TENANTS[tenant % len(_TENANTS)]
    lines = [
        f"You are the customer support assistant of {name}. You help customers with {scope}. "
        f"Answer in {voice} voice, in the customer's language, and never invent facts about an account.",
    ]
    for i, topic in enumerate(_TOPICS, 1):
        lines.append(
            f"Policy {i} ({topic}): follow the {name} handbook section {i}.{tenant + 1} on {topic}; if the "
            f"customer's request is not covered, say so and offer to open a ticket for the {topic} team."
        )
    return "\n".join(lines)


@dataclass
class Request:
    route: str  # a pool name or the A/B route
    kind: str  # hello, ab, ab-sticky, conversation
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    on_done: Callable[[dict[str, Any] | None], None] | None = None

    @property
    def path(self) -> str:
        return f"/v1/{self.route}/chat/completions"


@dataclass
class Conversation:
    id: int
    tenant: int
    messages: list[dict[str, str]]
    turns_left: int
    busy: bool = False


class Workload:
    """Makes the requests of the three scenarios; conversations remember their turns."""

    def __init__(self, models: dict[str, str], rng: random.Random, conversations_per_pool: int = 6) -> None:
        self.models = models  # pool -> served model name
        self.rng = rng
        self.ab_count = 0
        self.users = [f"user-{n}" for n in rng.sample(range(1000, 10000), 8)]
        self._next_tenant = 0
        self._conversations_started = 0
        self.conversations: dict[str, list[Conversation]] = {
            pool: [self._new_conversation() for _ in range(conversations_per_pool)] for pool in models
        }

    def _new_conversation(self) -> Conversation:
        tenant = self._next_tenant % len(_TENANTS)
        self._next_tenant += 1
        self._conversations_started += 1
        return Conversation(
            id=self._conversations_started,
            tenant=tenant,
            messages=[{"role": "system", "content": system_prompt(tenant)}],
            turns_left=self.rng.randint(3, 6),
        )

    def hello(self, pool: str) -> Request:
        """The write-up's curl body for a pool: ``{"model": ..., "messages": [... "Hello from 1B model!"}]}``."""
        content = f"Hello from {pool.upper()} model!"
        return Request(pool, "hello", {"model": self.models[pool], "messages": [{"role": "user", "content": content}]})

    def ab(self, sticky: bool = False) -> Request:
        """The write-up's A/B body: {"model": "auto", ... "Test A/B routing #i"}; optionally as one of the users."""
        self.ab_count += 1
        body = {"model": "auto", "messages": [{"role": "user", "content": f"Test A/B routing #{self.ab_count}"}]}
        if not sticky:
            return Request(AB_ROUTE, "ab", body)
        user = self.rng.choice(self.users)
        return Request(AB_ROUTE, "ab-sticky", body, {STICKY_HEADER: user}, user=user)

    def conversation_turn(self, pool: str) -> Request:
        idle = [c for c in self.conversations[pool] if not c.busy]
        if idle:
            conv = self.rng.choice(idle)
        else:  # every conversation is waiting for an answer: a one-off question of a tenant
            conv = self._new_conversation()
            conv.turns_left = 1
        question = self.rng.choice(_QUESTIONS)
        conv.messages.append({"role": "user", "content": f"{question} (customer {conv.id})"})
        conv.busy = True
        messages = list(conv.messages)

        def done(answer: dict[str, Any] | None) -> None:
            conv.busy = False
            if answer is None:
                conv.messages.pop()  # the turn failed: ask something else next time
                return
            content = ""
            with contextlib.suppress(KeyError, IndexError, TypeError):
                content = str(answer["choices"][0]["message"]["content"])
            conv.messages.append({"role": "assistant", "content": content})
            conv.turns_left -= 1
            if conv.turns_left <= 0 and conv in self.conversations[pool]:
                self.conversations[pool][self.conversations[pool].index(conv)] = self._new_conversation()

        return Request(pool, "conversation", {"model": self.models[pool], "messages": messages}, on_done=done)


@dataclass
class Phase:
    name: str
    title: str
    duration: float
    next_request: Callable[[], Request]


def make_phases(workload: Workload, duration: float, rng: random.Random) -> list[Phase]:
    pools = list(workload.models)
    counter = {"i": 0}

    def path_routing() -> Request:
        counter["i"] += 1
        return workload.hello(pools[counter["i"] % len(pools)])

    def ab_split() -> Request:
        counter["i"] += 1
        return workload.ab(sticky=counter["i"] % 4 == 0)

    load_mix: list[tuple[float, Callable[[], Request]]] = []
    for pool in pools:
        load_mix.append((0.35, functools.partial(workload.conversation_turn, pool)))
        load_mix.append((0.05, functools.partial(workload.hello, pool)))
    load_mix.append((0.20, workload.ab))
    weights = [w for w, _ in load_mix]

    def load_test() -> Request:
        return rng.choices([f for _, f in load_mix], weights)[0]()

    shares = dict(PHASE_SHARES)
    return [
        Phase(
            "path-routing",
            "path routing: the write-up's bodies to /v1/1b/chat/completions and /v1/3b/chat/completions",
            duration * shares["path-routing"],
            path_routing,
        ),
        Phase(
            "ab-split",
            f'A/B split: "model": "auto" to /v1/{AB_ROUTE}/chat/completions '
            f"({' / '.join(f'{p} {w}%' for p, w in AB_WEIGHTS.items())}; 1 in 4 with {STICKY_HEADER})",
            duration * shares["ab-split"],
            ab_split,
        ),
        Phase(
            "load-test",
            "load test: multi-turn conversations of 3 tenants on both pools, plus single requests and A/B traffic",
            duration * shares["load-test"],
            load_test,
        ),
    ]
