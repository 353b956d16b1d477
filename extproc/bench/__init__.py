"""The benchmarks behind ``extproc bench``: what the picker costs and how well it routes.

A wing: nothing on the request path imports it. `overhead` (latency the picker adds over Envoy alone and over a
do-nothing ext_proc, `noop_extproc`; the picker's throughput), `routing` (routing quality, policies against
workloads) and `sim_throughput` start the real processes through `extproc.local` and measure from outside;
`decision` times one scheduling decision in process. `loadgen` and `workloads` are the traffic they share, and
every percentile they print is `extproc.stats.percentile`, so their figures compare.
"""
