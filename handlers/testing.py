"""Test a handler without a server: a FakeContext and request builders.

    from handlers.testing import FakeContext, raw_request, json_request, run_handler

    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config={"classifier": {"top_k": 3}})
    handler = MyClassifier()
    handler.initialize(ctx)
    responses = run_handler(handler, ctx, [raw_request(jpeg_bytes), json_request({"data": "???"})])
    assert responses[0].status == 200 and responses[1].status == 400

`FakeContext` is TorchServe's own `ts.context.Context` with the request plumbing filled in the way
the worker fills it, and a `FakeMetrics` that records every metric call instead of logging it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ts.context import Context, RequestProcessor


@dataclass
class MetricCall:
    kind: str  # "time", "counter", "size", "percent", "metric"
    name: str
    value: float
    unit: str = ""


@dataclass
class FakeMetrics:
    """Records metric calls; the subset of TorchServe's MetricsCache API handlers use."""

    calls: list[MetricCall] = field(default_factory=list)
    request_ids: dict[int, str] | None = None

    def add_time(self, name: str, value: float, idx: int | None = None, unit: str = "ms", dimensions: list[Any] | None = None, metric_type: object = None) -> None:
        self.calls.append(MetricCall("time", name, value, unit))

    def add_counter(self, name: str, value: float, idx: int | None = None, dimensions: list[Any] | None = None) -> None:
        self.calls.append(MetricCall("counter", name, value, "count"))

    def add_size(self, name: str, value: float, idx: int | None = None, unit: str = "MB", dimensions: list[Any] | None = None, metric_type: object = None) -> None:
        self.calls.append(MetricCall("size", name, value, unit))

    def add_percent(self, name: str, value: float, idx: int | None = None, dimensions: list[Any] | None = None, metric_type: object = None) -> None:
        self.calls.append(MetricCall("percent", name, value, "percent"))

    def add_metric(self, name: str, value: float, unit: str, idx: int | None = None, dimensions: list[Any] | None = None, metric_type: object = None) -> None:
        self.calls.append(MetricCall("metric", name, value, unit))

    def values(self, name: str) -> list[float]:
        return [c.value for c in self.calls if c.name == name]


@dataclass
class FakeRequest:
    """One request as the worker hands it to a handler: a row plus its headers."""

    row: dict[str, Any]
    headers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    status: int
    body: Any
    content_type: str | None


class FakeContext(Context):
    """A TorchServe Context for unit tests: model dir, manifest, model-config, GPU id, metrics."""

    def __init__(
        self,
        model_dir: str | Path,
        serialized_file: str | None = None,
        handler_config: dict[str, Any] | None = None,
        model_yaml_config: dict[str, Any] | None = None,
        batch_size: int = 1,
        gpu_id: int | None = None,
        model_name: str = "test_model",
        manifest: dict[str, Any] | None = None,
    ) -> None:
        if manifest is None:
            manifest = {"model": {"modelName": model_name, "handler": "handler.py"}}
            if serialized_file:
                manifest["model"]["serializedFile"] = serialized_file
        yaml_config = dict(model_yaml_config or {})
        if handler_config is not None:
            yaml_config["handler"] = handler_config
        yaml_config.setdefault("batchSize", batch_size)
        super().__init__(
            model_name, str(model_dir), manifest, batch_size, gpu_id, "0.12.0",
            metrics=FakeMetrics(), model_yaml_config=yaml_config,
        )

    def start_batch(self, requests: list[FakeRequest]) -> list[dict[str, Any]]:
        """Install per-request headers/statuses as the worker does; returns the rows for handle()."""
        self.request_ids = {i: f"req-{i}" for i in range(len(requests))}
        self.request_processor = [RequestProcessor(dict(r.headers)) for r in requests]
        self.metrics.request_ids = self.request_ids
        return [r.row for r in requests]

    def response(self, idx: int, body: Any) -> Response:
        status, _ = self.get_response_status(idx)
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8")
        content_type = self.get_response_content_type(idx)
        if isinstance(body, str) and content_type == "application/json":
            body = json.loads(body)
        return Response(status=status, body=body, content_type=content_type)


def raw_request(data: bytes, content_type: str = "application/octet-stream") -> FakeRequest:
    return FakeRequest({"body": data}, {"body": {"content-type": content_type}})


def json_request(obj: Any) -> FakeRequest:
    """A JSON body as TorchServe delivers it: already parsed."""
    return FakeRequest({"body": obj}, {"body": {"content-type": "application/json"}})


def broken_json_request(text: bytes) -> FakeRequest:
    """A body declared as JSON that did not parse: TorchServe forwards the raw bytes."""
    return FakeRequest({"body": text}, {"body": {"content-type": "application/json"}})


def multipart_request(fields: dict[str, bytes | str]) -> FakeRequest:
    row = dict(fields)
    headers = {
        name: {"content-type": "application/octet-stream" if isinstance(v, bytes) else "text/plain"}
        for name, v in fields.items()
    }
    return FakeRequest(row, headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run_handler(handler: Any, context: FakeContext, requests: list[FakeRequest]) -> list[Response]:
    """Call handler.handle like the worker does and return each request's status and parsed body."""
    rows = context.start_batch(requests)
    bodies = handler.handle(rows, context)
    if len(bodies) != len(requests):
        raise AssertionError(f"handler returned {len(bodies)} responses for {len(requests)} requests")
    return [context.response(i, body) for i, body in enumerate(bodies)]
