"""The data layer: which endpoints each pool has, and what the picker knows of each, kept current.

``endpoint`` defines an endpoint's state and names the one writer of each field; ``table`` holds every
pool's states and tells listeners about membership changes; ``discovery`` writes membership (one
endpoint source per pool: ``sources`` has the interface, the registry and static lists, ``dns`` a
headless Service's records; config reloads are applied there too); ``scrape`` writes load figures from
vLLM's /metrics; ``eds`` mirrors membership into Envoy EDS files. All of it runs in the background on the
server's event loop; the request path only reads the table.
"""
