"""`extproc demo`: the multi-model demo of the write-up, on a laptop: the gateway plus its three traffic scenarios.

It starts the local gateway of `extproc up` (`extproc.local.multi_model`: two simulated Llama-3.2-1B
replicas, two simulated Llama-3.2-3B replicas, the picker and Envoy, with the A/B split ``/v1/ab-test/...``:
70% to pool ``1b``, 30% to pool ``3b``, sticky on ``x-user-id``), then sends, at ``--rate`` requests/s
in total (open loop):

1. **path routing** (15% of the time): the write-up's bodies to ``/v1/1b/chat/completions`` and
   ``/v1/3b/chat/completions``, alternately;
2. **A/B split** (25%): ``{"model": "auto", ...}`` to ``/v1/ab-test/chat/completions``; one request in
   four carries an ``x-user-id`` of a handful of users, to show that a user stays on one arm;
3. **load test** (60%): both pools at once: multi-turn conversations of three tenants, each tenant's
   conversations sharing a long system prompt (so prefix-cache hits show), a few single-turn requests,
   and a fifth of A/B requests.

Then it prints a summary (and writes ``--json`` and ``--report``). Without ``--duration`` the scenarios
take 60 s and the gateway stays up for your own ``curl`` commands until Ctrl-C; with ``--duration S`` the
scenarios take S seconds (startup, about 5 s, comes on top) and the command exits. Ctrl-C at any time
stops every process the demo started; interrupted scenarios still get a (partial) summary and exit 130.

One module per job: `workload` (the requests of the three scenarios), `traffic` (sending them, one
`Outcome` per answer), `snapshots` (the processes' counters before and after), `summary` (the JSON
summary; its docstring documents every key and where each figure comes from), `summary_text` (the summary
as printed), `report` (``--report``: charts and index.html), `command` (the CLI, start and stop). The
statistics are the project's own, `extproc.stats`.
"""

from extproc.local.demo.command import add_parser, main

__all__ = ["add_parser", "main"]
