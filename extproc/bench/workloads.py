"""Request streams for `extproc bench routing`: who shares which prefix, and when requests arrive.

Every workload is deterministic given its seed: the same seed gives the same arrival times (Poisson, in
simulated seconds) and the same prompts, so every policy of a (workload, rate) cell sees the same stream.
Prompts are plain ASCII text; the simulator counts 4 characters as one token, so ``tokens`` below are
simulated tokens of the rendered chat (see ``extproc/sim/tokens.py``).

- ``tenants``: many tenants, each with a long system prompt shared by its users, and short questions;
- ``hot``: ``tenants`` where one tenant sends a large share of the traffic;
- ``random``: unique prompts, no sharing at all;
- ``multiturn``: chat sessions whose prompt grows turn by turn; a session's next turn is only sent once
  its previous answer has arrived (the answer is appended, as a chat client does);
- ``multitenant``: ``multiturn``'s sessions, each opening with its tenant's long system prompt: uniform
  tenants whose users chat (`extproc bench peers`; `extproc bench routing` when named);
- ``pressure``: ``tenants`` with many more of them, longer system prompts and Zipf-skewed traffic: a working set
  about four times the routing benchmark pool's whole KV cache, so every replica evicts all the time and
  only the popular prefixes are worth keeping (`extproc bench routing`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from extproc.sim.tokens import generated_text

CHARS_PER_TOKEN = 4  # as the simulator counts
MODEL = "llama-3-2-1b"

_VOCABULARY = (
    "account address after again against agent answer apply area around array balance batch before "
    "behind between billing block border branch bridge budget buffer build button cache call cancel "
    "carbon career cargo center change channel charge check choice circle claim class client cloud "
    "cluster code column common config contract control copy corner count course credit current customer "
    "cycle daily damage data debit decide default delay deliver demand deploy design detail device direct "
    "domain double draft driver early effect engine entry error event exact export factor feature field "
    "figure filter final finance flight floor follow format forward frame future gateway global graph "
    "green group growth guard handle header health history holder hotel image import income index input "
    "insert invoice issue item journal kernel label layer ledger level limit linear listen local lookup "
    "machine manual margin market master matrix member memory merge method metric middle mirror model "
    "module monitor motion native network node notice number object office option order origin output "
    "owner packet parcel partner payment period permit phase pipeline planet policy portal power premium "
    "price primary private process product profile project prompt proxy public quality query queue quota "
    "random range ratio reader record refund region release remote report request reserve result retail "
    "review route router sample scale schema score screen search season secret sector select sensor server "
    "service session signal single source spread stable stage status storage stream submit supply switch "
    "system table target tenant ticket timer token total trace track trade traffic travel update upload "
    "usage user value vector vendor version volume voucher wallet warning weight window worker yield zone"
)
_WORDS = _VOCABULARY.split()


def text(rng: random.Random, tokens: int, lead: str = "") -> str:
    """``lead`` followed by random words, exactly ``tokens`` simulated tokens (4 characters each) long."""
    size = tokens * CHARS_PER_TOKEN
    parts = [lead] if lead else []
    length = len(lead)
    choices = rng.choices(_WORDS, k=size // 4 + 8)
    i = 0
    while length < size:
        if i == len(choices):
            choices = rng.choices(_WORDS, k=64)
            i = 0
        word = choices[i]
        i += 1
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def poisson_arrivals(rng: random.Random, rate: float, count: int) -> list[float]:
    """``count`` arrival times (seconds from 0) of a Poisson process of ``rate`` per second."""
    at = 0.0
    out = []
    for _ in range(count):
        at += rng.expovariate(rate)
        out.append(at)
    return out


def chat_body(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens})


@dataclass
class Turn:
    """One request the sender is about to send."""

    body: bytes
    key: str  # tenant or session: what shares a prefix
    session: Session | None = None


class Workload(Protocol):
    name: str
    arrivals: list[float]  # simulated seconds from the start of the cell

    def next(self, index: int) -> Turn:
        """The request to send at ``arrivals[index]``; called in order, at send time."""
        ...

    def answered(self, turn: Turn, content: str | None) -> None:
        """The answer to ``turn`` arrived (``content`` None: the request failed)."""
        ...


@dataclass
class StaticWorkload:
    """Every request known in advance (``tenants``, ``hot``, ``random``)."""

    name: str
    arrivals: list[float]
    turns: list[Turn]
    info: dict[str, Any] = field(default_factory=dict)

    def next(self, index: int) -> Turn:
        return self.turns[index]

    def answered(self, turn: Turn, content: str | None) -> None:
        return None


# ----- tenants and hot ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantParams:
    tenants: int = 48
    users_per_tenant: int = 4
    system_tokens: tuple[int, int] = (2500, 3500)  # each tenant's system prompt length, uniform
    question_tokens: tuple[int, int] = (40, 60)
    hot_share: float = 0.0  # share of the traffic that goes to tenant 0 (0: all tenants alike)

    def working_set_tokens(self) -> int:
        return self.tenants * sum(self.system_tokens) // 2


def tenant_prompts(seed: int, params: TenantParams) -> list[str]:
    """Each tenant's system prompt; its first characters name the tenant, so no two share a block."""
    out = []
    for t in range(params.tenants):
        rng = random.Random(f"{seed}-tenant-{t}")
        size = rng.randint(*params.system_tokens)
        out.append(text(rng, size, f"You are the assistant of tenant {t:03d}. Policies and reference:"))
    return out


def tenants_workload(
    seed: int, rate: float, count: int, max_tokens: int, params: TenantParams, name: str = "tenants"
) -> StaticWorkload:
    rng = random.Random(f"{seed}-{name}-{rate:g}")
    arrivals = poisson_arrivals(rng, rate, count)
    systems = tenant_prompts(seed, params)
    turns = []
    for i in range(count):
        if params.hot_share > 0 and rng.random() < params.hot_share:
            tenant = 0
        elif params.hot_share > 0:
            tenant = rng.randrange(1, params.tenants)
        else:
            tenant = rng.randrange(params.tenants)
        user = rng.randrange(params.users_per_tenant)
        question = text(rng, rng.randint(*params.question_tokens), f"[user {tenant:03d}-{user}, request {i}]")
        messages = [{"role": "system", "content": systems[tenant]}, {"role": "user", "content": question}]
        turns.append(Turn(chat_body(messages, max_tokens), f"tenant-{tenant}"))
    info = {"working_set_tokens": params.working_set_tokens(), **params.__dict__}
    return StaticWorkload(name, arrivals, turns, info)


# ----- random ------------------------------------------------------------------------------------------


def random_workload(
    seed: int, rate: float, count: int, max_tokens: int, prompt_tokens: tuple[int, int] = (900, 1100)
) -> StaticWorkload:
    rng = random.Random(f"{seed}-random-{rate:g}")
    arrivals = poisson_arrivals(rng, rate, count)
    turns = []
    for i in range(count):
        content = text(rng, rng.randint(*prompt_tokens), f"Request {i} {rng.getrandbits(64):016x}:")
        turns.append(Turn(chat_body([{"role": "user", "content": content}], max_tokens), f"request-{i}"))
    return StaticWorkload(name="random", arrivals=arrivals, turns=turns, info={"prompt_tokens": prompt_tokens})


# ----- multiturn ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiturnParams:
    sessions: int = 96  # active sessions kept in the pool
    context_tokens: tuple[int, int] = (1000, 1400)  # each session's opening context (system + document)
    user_tokens: tuple[int, int] = (80, 120)  # each new user message
    turns: tuple[int, int] = (4, 10)  # turns per session, uniform

    def working_set_tokens(self, max_tokens: int) -> int:
        """Active sessions times their mean prompt at mid-session."""
        mid_turns = sum(self.turns) / 4
        per_turn = sum(self.user_tokens) / 2 + max_tokens + 8
        return int(self.sessions * (sum(self.context_tokens) / 2 + mid_turns * per_turn))


@dataclass(eq=False)
class Session:
    number: int
    rng: random.Random
    turns: int
    messages: list[dict[str, str]]
    done: int = 0


class MultiturnWorkload:
    """A pool of chat sessions; each arrival takes one of the idle sessions, drawn at random.

    A session is never sent its next turn before its previous answer arrived; if every session is busy
    at an arrival (the system is slow), a new session starts, as a new user would. A session ends after
    its number of turns and is replaced by a new one. Session ``k``'s content depends only on the seed
    and ``k``; which session an arrival takes depends on when answers came back. Answers are the
    simulator's (a fixed text per length), so the next turn's prompt is what a chat client would send.

    The draw is random, not oldest-first: with a fixed pool cycled in order, round robin would send each
    session back to the same replica every cycle whenever the pool size is a multiple of the replica
    count, an affinity real users' think times never give it.
    """

    def __init__(self, seed: int, rate: float, count: int, max_tokens: int, params: MultiturnParams) -> None:
        self.name = "multiturn"
        self.seed = seed
        self.params = params
        self.max_tokens = max_tokens
        self.rng = random.Random(f"{seed}-multiturn-{rate:g}")
        self.arrivals = poisson_arrivals(self.rng, rate, count)
        self.idle: list[Session] = []
        self.started = 0
        self.info: dict[str, Any] = {
            "working_set_tokens": params.working_set_tokens(max_tokens),
            **params.__dict__,
        }
        # The opening pool is caught mid-conversation (each session already had a random number of its
        # turns, with the simulator's answers), so a cell starts near the steady mix of new and continued
        # sessions instead of with every session at its first turn.
        for _ in range(params.sessions):
            self.idle.append(self._new_session(advance=True))

    def _new_session(self, advance: bool = False) -> Session:
        k = self.started
        self.started += 1
        rng = random.Random(f"{self.seed}-session-{k}")
        context = self._opening(k, rng)
        session = Session(k, rng, rng.randint(*self.params.turns), [{"role": "system", "content": context}])
        if advance:
            answer = "".join(generated_text(i) for i in range(self.max_tokens))
            for _ in range(rng.randrange(session.turns)):
                question = text(rng, rng.randint(*self.params.user_tokens), f"Turn {session.done + 1}:")
                session.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                session.done += 1
        return session

    def _opening(self, k: int, rng: random.Random) -> str:
        """Session ``k``'s system message: a context document of its own."""
        return text(rng, rng.randint(*self.params.context_tokens), f"Session {k:05d}. Context document:")

    def next(self, index: int) -> Turn:
        session = self.idle.pop(self.rng.randrange(len(self.idle))) if self.idle else self._new_session()
        rng = session.rng
        question = text(rng, rng.randint(*self.params.user_tokens), f"Turn {session.done + 1}:")
        session.messages.append({"role": "user", "content": question})
        return Turn(chat_body(session.messages, self.max_tokens), f"session-{session.number}", session)

    def answered(self, turn: Turn, content: str | None) -> None:
        session = turn.session
        assert session is not None
        if content is None:  # failed: the client gives the turn up, as a user would, and moves on
            session.messages.pop()
        else:
            session.messages.append({"role": "assistant", "content": content})
        session.done += 1
        if session.done >= session.turns:
            self.idle.append(self._new_session())
        else:
            self.idle.append(session)


# ----- multitenant -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultitenantParams:
    """Uniform tenants whose users chat (the working set is about three 1,000-block replica caches)."""

    tenants: int = 32
    sessions_per_tenant: int = 2  # active sessions of each tenant
    system_tokens: tuple[int, int] = (1000, 1400)  # each tenant's system prompt, shared by its sessions
    user_tokens: tuple[int, int] = (30, 50)
    turns: tuple[int, int] = (2, 6)

    def sessions(self) -> MultiturnParams:
        """The sessions behind the tenants' prompts: no context of their own (the opening is the tenant's)."""
        count = self.tenants * self.sessions_per_tenant
        return MultiturnParams(sessions=count, context_tokens=(0, 0), user_tokens=self.user_tokens, turns=self.turns)

    def working_set_tokens(self, max_tokens: int) -> int:
        """Every tenant's system prompt once, plus each active session's own history at mid-session."""
        return self.tenants * sum(self.system_tokens) // 2 + self.sessions().working_set_tokens(max_tokens)


class MultitenantWorkload(MultiturnWorkload):
    """``multitenant``: ``multiturn`` whose sessions open with their tenant's system prompt, not a document each.

    Session ``k`` belongs to tenant ``k mod tenants``, so every tenant keeps the same number of active
    sessions; a router that keeps a tenant on one replica serves the long shared prefix from its cache and
    each session's short history behind it, one that spreads tenants recomputes the prefix.
    """

    def __init__(self, seed: int, rate: float, count: int, max_tokens: int, params: MultitenantParams) -> None:
        self.systems = tenant_prompts(seed, TenantParams(tenants=params.tenants, system_tokens=params.system_tokens))
        super().__init__(seed, rate, count, max_tokens, params.sessions())
        self.name = "multitenant"
        self.info = {"working_set_tokens": params.working_set_tokens(max_tokens), **params.__dict__}

    def _opening(self, k: int, rng: random.Random) -> str:
        return self.systems[k % len(self.systems)]


# ----- pressure ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PressureParams:
    """Many tenants with long system prompts and Zipf-skewed traffic: a working set far beyond the KV cache.

    At the defaults the working set (every tenant's system prompt once, 256 x ~4,000 tokens = 1.02M tokens) is
    3.9x the routing benchmark pool's KV capacity (4 replicas x 4,096 blocks x 16 tokens = 262,144 tokens):
    the pool holds ~60 of the 256 prompts. Tenant ``k`` (0-based) is drawn with weight ``1 / (k + 1) ** zipf_s``:
    the top 16 tenants send ~48 % of the traffic, the top 64 ~72 %, the bottom half ~15 %.
    """

    tenants: int = 256
    system_tokens: tuple[int, int] = (3000, 5000)  # each tenant's system prompt length, uniform
    question_tokens: tuple[int, int] = (30, 60)
    zipf_s: float = 0.9

    def working_set_tokens(self) -> int:
        return self.tenants * sum(self.system_tokens) // 2

    def shares(self) -> list[float]:
        """Each tenant's share of the traffic (Zipf over the tenant number)."""
        weights = [1.0 / (k + 1) ** self.zipf_s for k in range(self.tenants)]
        total = sum(weights)
        return [w / total for w in weights]


def pressure_workload(seed: int, rate: float, count: int, max_tokens: int, params: PressureParams) -> StaticWorkload:
    """``pressure``: Zipf-drawn tenants, each request its tenant's system prompt and a question of its own."""
    rng = random.Random(f"{seed}-pressure-{rate:g}")
    arrivals = poisson_arrivals(rng, rate, count)
    systems = tenant_prompts(seed, TenantParams(tenants=params.tenants, system_tokens=params.system_tokens))
    cumulative = list(itertools.accumulate(params.shares()))
    picks = rng.choices(range(params.tenants), cum_weights=cumulative, k=count)
    turns = []
    for i, tenant in enumerate(picks):
        question = text(rng, rng.randint(*params.question_tokens), f"[tenant {tenant:03d} request {i}]")
        messages = [{"role": "system", "content": systems[tenant]}, {"role": "user", "content": question}]
        turns.append(Turn(chat_body(messages, max_tokens), f"tenant-{tenant}"))
    return StaticWorkload("pressure", arrivals, turns, describe("pressure", max_tokens))


# ----- the catalogue -----------------------------------------------------------------------------------

WORKLOADS: Sequence[str] = ("tenants", "multiturn", "random", "hot")  # every benchmark's
ROUTING_WORKLOADS: Sequence[str] = (*WORKLOADS, "multitenant", "pressure")  # `extproc bench routing --workloads`

HOT = TenantParams(hot_share=0.75)


def make_workload(name: str, seed: int, rate: float, count: int, max_tokens: int) -> Workload:
    if name == "tenants":
        return tenants_workload(seed, rate, count, max_tokens, TenantParams())
    if name == "hot":
        return tenants_workload(seed, rate, count, max_tokens, HOT, name="hot")
    if name == "random":
        return random_workload(seed, rate, count, max_tokens)
    if name == "multiturn":
        return MultiturnWorkload(seed, rate, count, max_tokens, MultiturnParams())
    if name == "multitenant":
        return MultitenantWorkload(seed, rate, count, max_tokens, MultitenantParams())
    if name == "pressure":
        return pressure_workload(seed, rate, count, max_tokens, PressureParams())
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(ROUTING_WORKLOADS)}")


def describe(name: str, max_tokens: int) -> dict[str, Any]:
    """The workload's parameters, for the JSON and the docs."""
    if name == "tenants":
        return {**TenantParams().__dict__, "working_set_tokens": TenantParams().working_set_tokens()}
    if name == "hot":
        return {**HOT.__dict__, "working_set_tokens": HOT.working_set_tokens()}
    if name == "random":
        return {"prompt_tokens": (900, 1100), "shared": "nothing"}
    if name == "multiturn":
        p = MultiturnParams()
        return {**p.__dict__, "working_set_tokens": p.working_set_tokens(max_tokens)}
    if name == "multitenant":
        m = MultitenantParams()
        return {**m.__dict__, "working_set_tokens": m.working_set_tokens(max_tokens)}
    if name == "pressure":
        p = PressureParams()
        shares = p.shares()
        return {
            **p.__dict__,
            "working_set_tokens": p.working_set_tokens(),
            "top_16_share": round(sum(shares[:16]), 3),
            "top_64_share": round(sum(shares[:64]), 3),
        }
    raise ValueError(name)


def write_workload_tokenizer(directory: Path, seed: int = 1) -> Path:
    """A model directory for the simulators and the picker (``--tokenizer example`` of the benchmarks): a small
    BPE trained on these workloads' words with 800 merges, ~4 characters per token on their text, as the
    simulator's stand-in tokenizer (and English in Llama 3's), so the rates and KV capacities calibrated for
    the workloads still hold."""
    from extproc.sim.example_tokenizer import write_example_tokenizer

    rng = random.Random(seed)
    corpus = [text(rng, 200) for _ in range(2000)]
    return write_example_tokenizer(directory, vocab_size=800, corpus=corpus)
