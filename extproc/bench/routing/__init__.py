"""`extproc bench routing`: does the default scorer beat simple policies on routing quality?

One pool of simulated Llama-3.2-1B replicas behind Envoy and `extproc serve`. For every workload, rate
and policy (a "cell") the ext_proc is restarted with that policy's ``scheduler:`` section, every replica's
prefix cache is emptied and the pool is left idle; then an open-loop Poisson stream of non-streaming chat
completions is sent through the gateway. The first share of each cell warms the caches up and is not
measured. Latencies are the simulator's own (``x-sim-ttft-ms``, ``x-sim-e2e-ms``: simulated milliseconds,
whatever ``--time-scale`` and the host's load), the prefix-cache hit rate is the simulators' own token
counters over the measured window, and the replica that served each request is Envoy's
``x-gateway-upstream-host``.

The ``precise`` policy is the default with its approximate ``prefix`` scorer replaced by ``precise_prefix``
(the engines' KV-cache events); a run with it starts simulators that publish events, for every policy of the
run. The ``pressure`` workload (a working set ~4x the pool's KV cache, Zipf tenants) is where the two differ
most; `targets.precise_check` holds ``precise`` to its bounds against ``default``.

Why these settings (see docs/routing-benchmark.md):

- ``--num-gpu-blocks 4096`` (65,536 tokens per replica): the shared-prefix workloads' working sets
  (48 tenants x ~3,000 tokens = 144k tokens; 64 chat sessions ~120k tokens) are about twice one replica's
  cache, while a quarter of them fits in one with room to spare. So a policy that spreads a prefix over
  every replica thrashes the LRU, and one that keeps each prefix on one replica hits.
- ``--time-scale 0.5``: the simulators run at twice real time, so a cell of 12 simulated seconds takes 6
  wall seconds and the full run fits in 10 minutes, while the highest wall rate stays where Python
  keeps up on two cores (each cell reports a keep-up figure). The picker's scrape interval is scaled with
  it (25 ms wall = 50 ms simulated, the default), so the picker sees the engines as often, in simulated
  time, as it would in real time.

The modules: `plan` (policies, rates, the cells to run), `switch` (restarting the picker with a policy over an
idle, cold pool), `cell` (sending one cell and summarising it), `targets` (the target check), `report` (tables,
Markdown, charts) and `command` (the options and the run).
"""
