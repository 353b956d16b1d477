"""The laptop stack: everything that runs the gateway locally as child processes, none of it on the request path.

`up` (``extproc up``) and `demo` (``extproc demo``) run the write-up's gateway defined once in `multi_model`;
`stack` starts simulators, the picker and Envoy, `procs` starts and stops any child by PID, `terminal` turns
Ctrl-C and SIGTERM into a stop request and prints lines that never fail; `prometheus` runs
a real Prometheus beside it, `dashboards` generates the Grafana dashboards, `promtext` reads Prometheus text
pages into numbers for the demo's and the benchmarks' snapshots.
"""
