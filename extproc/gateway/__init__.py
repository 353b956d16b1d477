"""The request path: Envoy's ext_proc messages in, one answer per message out.

``server`` is the grpc.aio adapter (reads messages into a ``context.RequestContext``, writes responses),
``protocol`` the Endpoint Picker Protocol on the wire, ``director`` request control (pool, body,
scheduling, the outcome), ``openai`` request bodies, ``telemetry`` the picker's metrics, ``app`` the
process that wires the rooms together, ``command`` the ``extproc serve`` command.
"""
