"""OpenTelemetry spans and metrics for workers; a no-op unless switched on.

`--otel console` prints to stdout; OTEL_EXPORTER_OTLP_ENDPOINT sends OTLP
(needs opentelemetry-exporter-otlp). The protocol core never imports this.
"""

from __future__ import annotations

import os
from typing import Any

from knhk_stream.protocol.entry import Entry


class Telemetry:
    """Counters, a latency histogram and a span per committed beat."""

    def __init__(self, mode: str | None = None, service: str = "knhk-stream") -> None:
        mode = mode or ("otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else None)
        self.enabled = mode in ("console", "otlp")
        self._providers: list[Any] = []
        if not self.enabled:
            return
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if mode == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as e:
                raise RuntimeError(
                    "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is missing: "
                    "pip install opentelemetry-exporter-otlp-proto-http"
                ) from e
            span_exporter: Any = OTLPSpanExporter()
            metric_exporter: Any = OTLPMetricExporter()
        else:
            span_exporter, metric_exporter = ConsoleSpanExporter(), ConsoleMetricExporter()
        resource = Resource.create({"service.name": service})
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=10_000)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._providers = [tracer_provider, meter_provider]
        self.tracer = tracer_provider.get_tracer("knhk_stream")
        meter = meter_provider.get_meter("knhk_stream")
        self.deltas = meter.create_counter("knhk.deltas.processed", description="deltas given a receipt")
        self.rejected = meter.create_counter("knhk.deltas.rejected", description="rejected deltas by code")
        self.beats = meter.create_counter("knhk.beats.committed", description="entries this worker appended")
        self.latency = meter.create_histogram("knhk.quorum.latency", unit="ms", description="beat end to commit")
        self.lag = meter.create_gauge("knhk.consumer.lag", description="records behind the high watermark")
        self.stalls = meter.create_counter("knhk.shard.stalls", description="shards that stopped committing")
        self.equivocations = meter.create_counter("knhk.quorum.equivocations", description="peers seen equivocating")
        self.alarms = meter.create_counter("knhk.peer.alarms", description="halts, head regressions, forged state")

    def deltas_processed(self, n: int, rejected_by_code: dict[str, int]) -> None:
        if self.enabled:
            self.deltas.add(n)
            for code, k in rejected_by_code.items():
                self.rejected.add(k, {"code": code})

    def beat_committed(self, entry: Entry, votes: int, threshold: int, latency_ms: float) -> None:
        if not self.enabled:
            return
        with self.tracer.start_as_current_span("knhk.beat.commit") as span:
            span.set_attribute("knhk.shard", entry.shard)
            span.set_attribute("knhk.beat.cycle", entry.cycle)
            span.set_attribute("knhk.lockchain.root", entry.root.hex())
            span.set_attribute("knhk.receipt.count", entry.receipt_count)
            span.set_attribute("knhk.quorum.votes", votes)
            span.set_attribute("knhk.quorum.threshold", threshold)
        self.beats.add(1, {"shard": entry.shard})
        self.latency.record(latency_ms, {"shard": entry.shard})

    def consumer_lag(self, shard: int, lag: int) -> None:
        if self.enabled:
            self.lag.set(lag, {"shard": shard})

    def stalled(self, shard: int) -> None:
        if self.enabled:
            self.stalls.add(1, {"shard": shard})

    def equivocation(self, shard: int, peer_id: str) -> None:
        if self.enabled:
            self.equivocations.add(1, {"shard": shard, "peer": peer_id})

    def alarm(self, shard: int, kind: str) -> None:
        if self.enabled:
            self.alarms.add(1, {"shard": shard, "kind": kind})

    def shutdown(self) -> None:
        for p in self._providers:
            p.shutdown()
