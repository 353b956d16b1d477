"""`extproc bench peers`: the project's gateway against the routers users could deploy instead.

The routing benchmark compares policies inside our own gateway, in the simulators' time. Users compare the
gateway with sglang-router and vllm-router, and they see it from their client. So every router here (Envoy +
`extproc serve` with the default policy and with round robin; sglang-router's cache_aware, round_robin and
power_of_two; vllm-router's cache_aware and round_robin) gets the same fresh simulators and the same
workloads (the routing benchmark's four plus ``multitenant``), as streaming chat requests with Poisson
arrivals, and is measured where a user measures: TTFT at the first chunk that carries text, inter-token
latency and e2e on the client's clock; the prefix-cache hit rate from the replicas' own counters; CPU per
request from each router's process tree. Then the issue's "Done when" checks, as ratios. See docs/peers.md.

The modules: `routers` (the catalogue, starting each on new replicas), `stream` (the streaming client, open
loop), `cpu` (process-tree CPU from /proc), `summary` (a cell's figures), `cell` (one cell, start to stop),
`plan` (routers, workloads, rates), `checks` (the Done-when rows), `report` (tables, Markdown, charts),
`calibrate` (round robin's capacity, for the rates) and `command` (the options and the run).
"""
