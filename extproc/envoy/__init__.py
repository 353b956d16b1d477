"""Envoy's side of the gateway: its bootstrap generated from the picker's configuration, and running Envoy.

`bootstrap` assembles and renders the bootstrap from `listener` (the ext_proc filter, routes, weighted splits,
response headers) and `clusters` (one ``override_host`` cluster per pool, EDS sources, the ext_proc's cluster),
built from envoy-data-plane's typed messages (`proto`). `command` is ``extproc envoy-config``, cheap to import;
`run` finds, validates and starts an Envoy for the local stack, the benchmarks and the tests.
"""
