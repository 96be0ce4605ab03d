"""Grafana dashboard for torchserve-gpu-handlers, generated as code with grafanalib.

    python deploy/grafana/dashboard.py            # rewrite deploy/grafana/torchserve-gpu-handlers.json
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON differs from this file

The panels read the recording rules of deploy/prometheus/rules.yml (load those first), so each
query here is short and the meaning of a number (a mean, a sampled p99, a ratio) is defined once,
in the rules file. Edit this file, never the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "torchserve-gpu-handlers.json"
UID = "tsgpu-torchserve"
DS = "${datasource}"
MODEL = 'model_name=~"$model"'

# (stage label in the rules, panel title, what the number covers)
STAGES = [
    ("fetch", "1. Fetch (URL inputs)", "Time to download URL inputs of one batch (only for requests with URLs)."),
    ("preprocess", "2. Preprocess", "Decode + resize + normalise one batch into one device tensor."),
    ("inference", "3. Backbone", "Compiled model forward on one batch."),
    ("handler", "4. Whole handler", "Our handler's handle() for one batch: inputs, preprocess, backbone, task, respond."),
    ("worker", "5. Worker (TorchServe PredictionTime)", "TorchServe's timing of the worker's predict call for one batch."),
]


def _require_grafanalib():
    try:
        import grafanalib.core as core
        from grafanalib._gen import DashboardEncoder
    except ImportError as exc:  # pragma: no cover - message only
        raise SystemExit("grafanalib is not installed: pip install -e '.[dev]' (or pip install grafanalib)") from exc
    return core, DashboardEncoder


def _panel(core, title: str, description: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, w: int = 12):
    return core.TimeSeries(
        title=title, description=description, dataSource=DS, unit=unit,
        gridPos=core.GridPos(h=8, w=w, x=x, y=y),
        targets=[core.Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i), datasource=DS)
                 for i, (expr, legend) in enumerate(targets)],
    )


def _row(core, title: str, y: int):
    return core.RowPanel(title=title, gridPos=core.GridPos(h=1, w=24, x=0, y=y))


def panels(core) -> list:
    """All panels, top to bottom, in the order of the request flow."""
    out, y = [], 0

    def row(title: str) -> None:
        nonlocal y
        out.append(_row(core, title, y))
        y += 1

    def pair(left: tuple, right: tuple | None = None) -> None:
        nonlocal y
        out.append(_panel(core, *left, x=0, y=y))
        if right is not None:
            out.append(_panel(core, *right, x=12, y=y))
        y += 8

    row("Traffic")
    pair(("Requests per second by model", "TorchServe frontend requests (all outcomes), rate over 1m.",
          [(f"model:ts_inference_requests:rate1m{{{MODEL}}}", "{{model_name}}")], "reqps"),
         ("Images answered per second by model", "Items our handler answered with a result (not an error).",
          [(f"model:tsgpu_images_processed:rate1m{{{MODEL}}}", "{{model_name}}")], "ops"))
    row("Errors")
    pair(("Responses by HTTP class (whole server)",
          "Share of 2xx/4xx/5xx. TorchServe 0.12 counts these per server, not per model; our handlers set "
          "a status per item, so one bad image in a batch is one 4xx.",
          [("code:ts_requests:ratio_rate1m", "{{code}}")], "percentunit"),
         ("Item errors per second by model",
          "Items answered with an error body ({code, type, message}); the type is in the body and logs, "
          "TorchServe's metrics carry no error type.",
          [(f"model:tsgpu_request_errors:rate1m{{{MODEL}}}", "{{model_name}}"),
           (f"model:tsgpu_item_error_ratio:rate1m{{{MODEL}}}", "{{model_name}} ratio")], "short"))
    pair(("Preprocess fallbacks per second",
          "Items an accelerated preprocess backend sent to the CPU path (0 when none).",
          [(f"model:tsgpu_preprocess_fallbacks:rate1m{{{MODEL}}}", "{{model_name}}")], "ops"))
    row("Latency and queue")
    pair(("Mean request latency",
          "Mean over 1m from TorchServe's latency counters (a mean, not a percentile: TorchServe 0.12 "
          "exports no histogram); dashed: worst 1-minute mean of the last 15 minutes.",
          [(f"model:ts_inference_latency_seconds:mean1m{{{MODEL}}}", "{{model_name}} mean"),
           (f"model:ts_inference_latency_seconds:mean1m_p99_over_15m{{{MODEL}}}", "{{model_name}} worst minute")], "s"),
         ("Queue: mean wait and mean requests waiting",
          "Mean time in TorchServe's queue per request, and seconds queued per second (= mean requests "
          "waiting, the autoscaling signal).",
          [(f"model:ts_queue_latency_seconds:mean1m{{{MODEL}}}", "{{model_name}} wait (s)"),
           (f"model:ts_queue_depth:mean1m{{{MODEL}}}", "{{model_name}} waiting")], "short"))
    row("Stages of the request flow (per batch)")
    for i, (stage, title, description) in enumerate(STAGES):
        if i % 2 == 0:
            x = 0
        expr = f'model_stage:tsgpu_stage_time_ms:{{agg}}{{{{stage="{stage}",{MODEL}}}}}'
        out.append(_panel(
            core, title, description + " Mean of the last-batch gauge over 1m, and the 99th percentile of "
            "its scraped samples over 5m (one batch per scrape: an estimate).",
            [(expr.format(agg="avg1m"), "{{model_name}} mean"),
             (expr.format(agg="sampled_p99_5m"), "{{model_name}} sampled p99")], "ms", x=x, y=y))
        x = 12
        if i % 2 == 1 or i == len(STAGES) - 1:
            y += 8
    row("Workers")
    pair(("Workers started per model",
          "One WorkerLoadTime series per worker loaded since the frontend started (stopped workers "
          "included): TorchServe 0.12 exports no live-worker gauge; the management API has the live count.",
          [(f"model:ts_workers_started:count{{{MODEL}}}", "{{model_name}}")], "short"))
    row("GPU (DCGM exporter)")
    pair(("GPU utilisation", "DCGM_FI_DEV_GPU_UTIL averaged over 1m.",
          [("gpu:dcgm_gpu_util:avg1m", "{{Hostname}} GPU {{gpu}}")], "percent"),
         ("GPU memory used", "DCGM_FI_DEV_FB_USED, max over 1m.",
          [("gpu:dcgm_fb_used_bytes:max1m", "{{Hostname}} GPU {{gpu}}")], "bytes"))
    pair(("GPU memory used share", "DCGM_FI_DEV_FB_USED / (USED + FREE); the GpuMemoryNearlyFull alert fires above 90%.",
          [("gpu:dcgm_fb_used:ratio", "{{Hostname}} GPU {{gpu}}")], "percentunit"))
    return out


def build():
    core, _ = _require_grafanalib()
    templating = core.Templating(list=[
        core.Template(name="datasource", label="Data source", type="datasource", query="prometheus", default="Prometheus"),
        core.Template(name="model", label="Model", dataSource=DS, query="label_values(ts_inference_requests_total, model_name)",
                      includeAll=True, multi=True, allValue=".*", default="$__all"),
    ])
    return core.Dashboard(
        title="TorchServe GPU handlers", uid=UID, tags=["torchserve", "tsgpu"], timezone="browser",
        refresh="30s", schemaVersion=39, templating=templating, panels=panels(core),
        description="Per-stage times, errors, queue, workers and GPU use of torchserve-gpu-handlers on TorchServe 0.12.",
    ).auto_panel_ids()


def render() -> str:
    _, encoder = _require_grafanalib()
    return json.dumps(build().to_json_data(), cls=encoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
