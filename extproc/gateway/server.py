"""The grpc.aio ExternalProcessor: Envoy's messages in, exactly one response per message out.

A thin adapter: it reads each message into the stream's `RequestContext` (protocol.py knows the
wire), hands the request to the `Director` at the headers and at the body, and writes the director's
outcome back as the response to that message. Every other message kind is let through unchanged; a
message that is not a ProcessingRequest at all ends the stream with INVALID_ARGUMENT.

Once the whole request is answered (the body's last message, or headers with no body) the picker ends the
stream itself, with OK. The generated Envoy sends nothing after the request (responses are not processed), and
would otherwise reset the stream when the HTTP request finishes: grpc.aio keeps about 120 bytes of native
memory for every stream cancelled that way (measured: a picker driven directly over gRPC grew 0.7 MB a minute
at 100 streams/s with client cancels, flat with clean ends), which was the picker's RSS growth in soaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.gateway import protocol
from extproc.gateway.context import RequestContext
from extproc.gateway.director import Director

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director) -> None:
        self.director = director

    async def Process(
        self, request_iterator: AsyncIterator[protocol.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.ProcessingResponse]:
        request = RequestContext(pool_hint=protocol.pool_hint(context.invocation_metadata()))
        director = self.director
        tokenized = director.tokenizer is not None  # a plugin scores the engine's tokens: render them first
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_body":
                    request.body = message.request_body.body
                    if tokenized:
                        yield protocol.answer(kind, await director.on_body_tokenized(request))
                    else:
                        yield protocol.answer(kind, director.on_body(request))
                    if message.request_body.end_of_stream:
                        return  # nothing more to decide: close the stream now (see the module's docstring)
                elif kind == "request_headers":
                    protocol.read_headers(message, request)
                    yield protocol.answer(kind, director.on_headers(request))
                    if request.end_of_stream:
                        return
                elif kind is not None:
                    yield protocol.passthrough(kind)
        except DecodeError:  # bytes that are no ProcessingRequest: a status, not a logged traceback per message
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed ProcessingRequest")
