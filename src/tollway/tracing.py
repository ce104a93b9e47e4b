"""Optional OpenTelemetry traces of gateway requests, exported over OTLP/HTTP.

Off unless ``TOLLWAY_OTLP_TRACES_ENDPOINT`` is set; then each worker, at startup, imports the
OpenTelemetry SDK (``pip install 'tollway[otel]'``) and exports in batches from a background
thread. Off, nothing of OpenTelemetry is imported and a request pays one ``is None`` test per
hook.

Per metered request, one ``SERVER`` span named after the GenAI semantic conventions
(``chat gpt-4o-mini``) with ``gen_ai.*`` attributes (system, operation, requested model, input
and output tokens) and Tollway's own (request, account and key ids, product, group, ratio, cost
as a decimal USD string and in nano-USD, usage source); its children: the upstream call
(``CLIENT``, from sending until the answer is in) and the settlement (the ledger write). Never a
key, a token, a header or a body.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from tollway import settings
from tollway.money import format_usd

#: where a request's :class:`CallTrace` is kept on the ASGI scope (the middleware ends it)
SCOPE_KEY = "tollway.trace"
#: route → gen_ai.operation.name
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/messages": "chat", "/v1/responses": "chat",
              "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
              "/v1/images/generations": "image_generation"}

DATA_PREFIX = "/apis/v1"
_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_NULL: AbstractContextManager[None] = nullcontext()


def enabled() -> bool:
    return _tracer is not None


def configure() -> None:
    """Each worker at startup: export to the configured endpoint, if any (and not already
    tracing, as a test that installed its own exporter is)."""
    endpoint = settings.get("otlp_traces_endpoint")
    if endpoint and _tracer is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        install(OTLPSpanExporter(endpoint=endpoint))


def install(exporter: Any, *, batch: bool = True) -> None:
    """Trace to ``exporter`` (an OpenTelemetry ``SpanExporter``); ``batch=False`` exports each
    span as it ends (tests)."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from tollway.metrics import instance

    provider = TracerProvider(resource=Resource.create(
        {"service.name": "tollway", "service.instance.id": instance()}))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("tollway")


def shutdown() -> None:
    """Flush and stop (a worker's shutdown)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def start(scope: MutableMapping[str, Any], *, route: str, endpoint_path: str | None,
          item_id: str, billing_type: str, system: str, account_id: int, key_id: int,
          group: str, ratio: str, request_id: str) -> CallTrace | None:
    """The request's span (None when tracing is off). A data API's route is its template
    (``/apis/v1/users/{id}``), never the path asked for."""
    if _tracer is None:
        return None
    if route not in OPERATIONS and endpoint_path:
        route = DATA_PREFIX + endpoint_path
    trace = CallTrace(scope, route=route, item_id=item_id, billing_type=billing_type,
                      system=system, attributes={
                          "tollway.request_id": request_id, "tollway.account_id": account_id,
                          "tollway.key_id": key_id, "tollway.product": item_id,
                          "tollway.billing_type": billing_type, "tollway.group": group,
                          "tollway.ratio": ratio})
    scope[SCOPE_KEY] = trace
    return trace


def settling(trace: CallTrace | None, *, cost_nano: int,
             record: dict[str, Any]) -> AbstractContextManager[None]:
    """Around the settlement's ledger write: its span, and the usage on the request's span."""
    return _NULL if trace is None else trace.settlement(cost_nano, record)


class CallTrace:
    """One request's spans."""

    def __init__(self, scope: MutableMapping[str, Any], *, route: str, item_id: str,
                 billing_type: str, system: str, attributes: dict[str, Any]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self._trace = trace
        operation = OPERATIONS.get(route) if billing_type == "token" or route in OPERATIONS \
            else None
        if operation is not None:
            attributes.update({"gen_ai.operation.name": operation, "gen_ai.system": system,
                               "gen_ai.provider.name": system,
                               "gen_ai.request.model": item_id})
        attributes.update({"http.request.method": scope.get("method", ""), "http.route": route})
        name = f"{operation or scope.get('method')} {item_id}"
        self.span = _tracer.start_span(name, kind=SpanKind.SERVER, attributes=attributes)
        self._context = trace.set_span_in_context(self.span)
        self._system = system
        self._genai = operation is not None
        self._upstream: Any = None

    def upstream_started(self, provider: str) -> None:
        from opentelemetry.trace import SpanKind

        self._upstream = _tracer.start_span(
            f"upstream {provider}", kind=SpanKind.CLIENT, context=self._context,
            attributes={"tollway.provider": provider, "gen_ai.system": self._system})

    def upstream_done(self, error: str | None = None) -> None:
        if self._upstream is not None:
            if error is not None:
                self._upstream.set_status(self._trace.Status(self._trace.StatusCode.ERROR,
                                                             error))
            self._upstream.end()
            self._upstream = None

    def failed(self, code: str) -> None:
        """The request failed before anything billable happened (nothing charged)."""
        self.upstream_done(code)
        self.span.set_attributes({"error.type": code, "tollway.cost_nano_usd": 0,
                                  "tollway.cost_usd": format_usd(0)})

    @contextmanager
    def settlement(self, cost_nano: int, record: dict[str, Any]) -> Iterator[None]:
        self.upstream_done()
        usage = {"gen_ai.usage.input_tokens": int(record.get("input_tokens") or 0),
                 "gen_ai.usage.output_tokens": int(record.get("output_tokens") or 0)} \
            if self._genai else {}
        self.span.set_attributes({**usage, "tollway.cost_nano_usd": cost_nano,
                                  "tollway.cost_usd": format_usd(cost_nano),
                                  "tollway.usage_source": str(record.get("usage_source")),
                                  "tollway.calls": int(record.get("calls") or 0)})
        span = _tracer.start_span("tollway.settle", context=self._context,
                                  attributes={"tollway.cost_nano_usd": cost_nano})
        try:
            yield
        except BaseException as exc:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def finish(self, status: int) -> None:
        """The response is over (the middleware)."""
        self.upstream_done()
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        self.span.end()
