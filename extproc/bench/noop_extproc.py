"""A do-nothing ext_proc: the transport floor the real picker is measured against.

It uses the same stack as `extproc serve` (grpc.aio, uvloop, upb protobuf) and answers every message
with the matching empty response, so the difference between the two is the picker's own work.
Run: ``python -m extproc.bench.noop_extproc --listen 127.0.0.1:9102``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.gateway import protocol


class NoopProcessor(ep_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[protocol.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind is not None:
                yield protocol.passthrough(kind)


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    server.add_insecure_port(listen)
    await server.start()
    print(f"noop ext_proc on {listen}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9102")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.listen))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
