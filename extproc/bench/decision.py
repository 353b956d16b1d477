"""`extproc bench decision`: the CPU cost of one scheduling decision, without any I/O.

A pool of 16 endpoints with varied queues and KV-cache use, a prefix index warmed by many
conversations that share a system prompt, and chat prompts of 4,000 tokens (16,000 characters).
Each iteration is timed on its own with ``perf_counter_ns``: prompt hashing alone (the prefix plugin's
share), and ``schedule()`` (hashing, prefix matching, scoring, recording), which is what the request
path pays; then ``schedule()`` of two identical schedulers alternately, one of them sharing its picks
(``state.backend: redis`` keeps each pick for the publisher): the request path's cost of sharing, as a ratio
within one run. The publisher's encoding (background, per pick) is timed too.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from extproc.cli import DefaultsHelp
from extproc.stats import percentile

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what can out other into more "
    "model token cache prefix request endpoint latency queue block prompt answer question system user"
)
_WORDS = _VOCABULARY.split()


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        n += len(word) + 1
    return " ".join(out)[:chars]


def _prompts(rng: random.Random, count: int, chars: int, system_chars: int) -> list[str]:
    """Rendered chat prompts: one shared system prompt, then each conversation's own turns."""
    system = f"<|system|>\n{_text(rng, system_chars)}\n"
    return [(system + f"<|user|>\n{_text(rng, chars)}")[:chars] for _ in range(count)]


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99 in microseconds."""
    return {f"p{q}": percentile(samples_ns, q / 100) / 1e3 for q in (50, 90, 99)}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decision",
        help="CPU time of one scheduling decision (prompt hashing, prefix matching, scoring)",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--iterations", type=int, default=20_000, help="timed decisions per case")
    p.add_argument("--endpoints", type=int, default=16, help="endpoints in the pool")
    p.add_argument("--prompt-chars", type=int, default=16_000, help="characters per prompt (~4 per token)")
    p.add_argument("--system-chars", type=int, default=2_000, help="characters of the shared system prompt")
    p.add_argument("--conversations", type=int, default=64, help="distinct prompts, all recorded in the index")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from extproc.scheduling import EndpointState, RoutingRequest, Scheduler  # the CLI imports this module
    from extproc.scheduling.prefix.scorer import PrefixScorer
    from extproc.state.records import encode_batch

    rng = random.Random(args.seed)
    scheduler = Scheduler(rng=random.Random(args.seed))
    shared = Scheduler(rng=random.Random(args.seed))  # the same policy, sharing its picks
    prefix = next(p for p in scheduler.plugins() if isinstance(p, PrefixScorer))
    model, pool = "bench-model", "bench"
    endpoints = [
        EndpointState(
            f"10.0.0.{i + 1}:8000",
            pool,
            waiting=float(rng.randint(0, 3)),
            running=float(rng.randint(0, 32)),
            kv_usage=rng.uniform(0.0, 0.7),
            scraped_at=0.0,
            scrape_ok=True,
        )
        for i in range(args.endpoints)
    ]
    prompts = _prompts(rng, args.conversations, args.prompt_chars, args.system_chars)
    requests = [RoutingRequest(pool, model, p, target_model=model) for p in prompts]
    for request in requests:  # warm the index: every conversation has been served once
        scheduler.schedule(request, endpoints, 0.5)
        shared.schedule(request, endpoints, 0.5)
    for e in endpoints:
        e.pending = 0
    shared.share(100_000)

    def reset_pending() -> None:
        for e in endpoints:  # as a fresh scrape would; not timed
            e.pending = 0

    def hashing(i: int) -> int:
        text = prompts[i % len(prompts)]
        start = time.perf_counter_ns()
        prefix.hashes(text, model)
        return time.perf_counter_ns() - start

    def schedule(i: int) -> int:
        """What the request path pays: hashing the prompt happens inside, in the prefix plugin."""
        request = requests[i % len(requests)]
        start = time.perf_counter_ns()
        scheduler.schedule(request, endpoints, 1.0)
        elapsed = time.perf_counter_ns() - start
        reset_pending()
        return elapsed

    blocks = len(prefix.hashes(prompts[0], model))
    print(
        f"{args.endpoints} endpoints, {args.prompt_chars}-char prompts ({blocks} blocks), "
        f"{args.conversations} conversations sharing a {args.system_chars}-char system prompt, "
        f"{args.iterations} iterations per case; default policy (queue 2, kv_cache 2, prefix 4)",
        flush=True,
    )
    print(f"{'case':<16}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}")
    results: dict[str, dict[str, float]] = {}
    for name, case in (("hash", hashing), ("hash+schedule", schedule)):
        for i in range(min(1000, args.iterations)):  # warm-up
            case(i)
        row = _percentiles([case(i) for i in range(args.iterations)])
        results[name] = row
        print(f"{name:<16}{row['p50']:>9.1f}{row['p90']:>9.1f}{row['p99']:>9.1f}", flush=True)
    # Local and sharing schedulers alternately, so that both see the same machine moment by moment.
    local_ns, shared_ns, encode_ns, encoded = [], [], 0, 0
    for i in range(args.iterations + 1000):
        request = requests[i % len(requests)]
        for target, samples in ((scheduler, local_ns), (shared, shared_ns)):
            start = time.perf_counter_ns()
            target.schedule(request, endpoints, 1.0)
            samples.append(time.perf_counter_ns() - start)
            reset_pending()
        if i % 256 == 255:  # the publisher's share, off the request path: take and encode a batch
            start = time.perf_counter_ns()
            batch = shared.take_shared()
            encode_batch(batch)
            encode_ns += time.perf_counter_ns() - start
            encoded += len(batch)
    shared.take_shared()
    for name, samples in (("local", local_ns), ("shared", shared_ns)):
        row = _percentiles(samples[1000:])
        results[f"schedule, {name}"] = row
        print(f"{'schedule, ' + name:<16}{row['p50']:>9.1f}{row['p90']:>9.1f}{row['p99']:>9.1f}", flush=True)
    ratio = results["schedule, shared"]["p50"] / results["schedule, local"]["p50"]
    per_pick = encode_ns / max(1, encoded) / 1e3
    results["sharing"] = {"p50_ratio": ratio, "encode_us_per_pick": per_pick}
    print(f"sharing picks (state.backend: redis): p50 {ratio:.3f}x local; the publisher encodes {per_pick:.1f} us/pick")
    results["index"] = {
        "blocks": float(prefix.index.total_blocks()),
        "distinct_blocks": float(prefix.index.distinct_blocks()),
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
