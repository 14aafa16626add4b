"""A real OTLP trace receiver for the tests: the collector's own protocol,
over gRPC (``grpc``, what port 4317 speaks) and over HTTP (``http/protobuf``,
``POST /v1/traces``, port 4318), keeping every span it is sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    """(trace_id, span_id) of each link."""
    events: list[str]
    """The names of the span's events (``exception``, ...)."""


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class Received:
    spans: list[ReceivedSpan] = field(default_factory=list)
    protocols: set[str] = field(default_factory=set)

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        self.protocols.add(protocol)
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[(k.trace_id.hex(), k.span_id.hex()) for k in span.links],
                            events=[e.name for e in span.events],
                        )
                    )

    def named(self, name: str, service: str = "") -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name and (not service or s.service == service)]


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._received.take(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class Receiver:
    """Both endpoints, on ephemeral ports of 127.0.0.1."""

    def __init__(self) -> None:
        self.received = Received()
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> Receiver:
        server = grpc.aio.server()
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(_Traces(self.received), server)  # type: ignore[no-untyped-call]
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc = server

        async def traces(request: web.Request) -> web.Response:
            message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
            self.received.take(message, "http/protobuf")
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            return web.Response(body=reply, content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._http = runner
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def env(self, protocol: str = "grpc") -> dict[str, str]:
        """What a process needs to send its spans here, without delay."""
        endpoint = (
            f"http://127.0.0.1:{self.grpc_port}"
            if protocol == "grpc"
            else f"http://127.0.0.1:{self.http_port}"
        )
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(0)
        if self._http is not None:
            await self._http.cleanup()
