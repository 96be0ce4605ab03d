"""`tsgpu kserve`: lay out a model store the way KServe's TorchServe runtime reads a storage URI.

    DIR/config/config.properties    ports, envelope and model_snapshot the kserve-torchserve runtime needs
    DIR/model-store/*.mar           the archives, copied
    DIR/inferenceservice.yaml       serving.kserve.io/v1beta1 InferenceService (modelFormat: pytorch)

Upload DIR to object storage and point `storageUri` at it. KServe mounts it at /mnt/models.
TorchServe's KServe envelopes parse only the FIRST request of a batch, so every model is written with
batchSize 1 here (one KServe request = one TorchServe batch; its `instances` are the items our
handler batches). See docs/deploy.md for what the envelope does to per-instance errors.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

MOUNT = "/mnt/models"
# KServe's TorchServe runtime image (pytorch/torchserve-kfs) starts torchserve and then its
# kserve_wrapper, a KServe ModelServer on 8080 (REST, where KServe routes) and 8081 (gRPC) that reads
# this file and forwards to TorchServe's inference_address/management_address in the same container.
# So TorchServe must stay off 8080/8081: it listens on loopback 8085 for both APIs (as pytorch/serve's
# kubernetes/kserve/config.properties does), and on 8082 for the metrics KServe scrapes.
INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, GRPC_PORT = 8085, 8085, 8082, 7070
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}


class KServeError(ValueError):
    pass


@dataclass
class MarInfo:
    name: str
    version: str
    file: str
    min_workers: int
    max_workers: int
    max_batch_delay: int
    response_timeout: int


def read_mar(path: Path) -> MarInfo:
    """Model name/version from MAR-INF/MANIFEST.json and worker settings from model-config.yaml."""
    with zipfile.ZipFile(path) as z:
        try:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        except KeyError:
            raise KServeError(f"{path}: no MAR-INF/MANIFEST.json; is it a .mar built by `tsgpu archive`?") from None
        cfg_name = manifest.get("model", {}).get("configFile")
        cfg = yaml.safe_load(z.read(cfg_name)) if cfg_name and cfg_name in z.namelist() else {}
    model = manifest.get("model", {})
    return MarInfo(
        name=model.get("modelName", path.stem), version=model.get("modelVersion", "1.0"), file=path.name,
        min_workers=int(cfg.get("minWorkers", 1)), max_workers=int(cfg.get("maxWorkers", cfg.get("minWorkers", 1))),
        max_batch_delay=int(cfg.get("maxBatchDelay", 10)), response_timeout=int(cfg.get("responseTimeout", 120)),
    )


def model_snapshot(infos: list[MarInfo]) -> dict:
    models = {
        i.name: {i.version: {"defaultVersion": True, "marName": i.file, "minWorkers": i.min_workers,
                             "maxWorkers": i.max_workers, "batchSize": 1, "maxBatchDelay": i.max_batch_delay,
                             "responseTimeout": i.response_timeout}}
        for i in infos
    }
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


def config_properties(infos: list[MarInfo], protocol: str = "v1") -> str:
    snapshot = json.dumps(model_snapshot(infos), separators=(",", ":"), sort_keys=True)
    return "\n".join([
        "# Written by `tsgpu kserve` for KServe's TorchServe runtime (storage mounted at /mnt/models).",
        "# TorchServe sits behind the image's kserve_wrapper (8080 REST, 8081 gRPC), which forwards here",
        f"inference_address=http://127.0.0.1:{INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{MANAGEMENT_PORT}",
        f"metrics_address=http://0.0.0.0:{METRICS_PORT}",
        f"grpc_inference_port={GRPC_PORT}",
        "grpc_management_address=127.0.0.1",
        "grpc_management_port=7071",
        "# Token authorization off: KServe's router and ingress cannot know TorchServe's random per-pod",
        "# keys. Protect the InferenceService with KServe/mesh authentication instead (docs/deploy.md).",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        "model_metrics_auto_detect=true",
        f"service_envelope={ENVELOPES[protocol]}",
        f"model_store={MOUNT}/model-store",
        f"model_snapshot={snapshot}",
        "",
    ])


def inference_service(name: str, storage_uri: str, protocol: str = "v1", gpus: int = 1,
                      min_replicas: int = 1, max_replicas: int = 4, scale_target: int = 4) -> dict:
    resources = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = gpus
        resources["limits"]["nvidia.com/gpu"] = gpus
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": {
            "minReplicas": min_replicas, "maxReplicas": max_replicas,
            # concurrency: in-flight requests per pod (Knative); one request is one TorchServe batch here
            "scaleMetric": "concurrency", "scaleTarget": scale_target,
            "model": {"modelFormat": {"name": "pytorch"}, "protocolVersion": protocol,
                      "storageUri": storage_uri, "resources": resources},
        }},
    }


def write_layout(model_store: str | Path, output: str | Path, name: str | None = None, protocol: str = "v1",
                 storage_uri: str | None = None, gpus: int = 1, force: bool = False) -> Path:
    """Write the KServe layout for every .mar in `model_store` into `output`; returns the YAML path."""
    if protocol not in ENVELOPES:
        raise KServeError(f"--protocol {protocol!r}: use v1 or v2")
    store, out = Path(model_store), Path(output)
    mars = sorted(store.glob("*.mar"))
    if not mars:
        raise KServeError(f"--model-store {store}: no .mar files (build them with `tsgpu archive`)")
    if out.exists() and any(out.iterdir()) and not force:
        raise KServeError(f"--output {out} is not empty: pass --force to overwrite")
    infos = [read_mar(p) for p in mars]
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    for p in mars:
        shutil.copy2(p, out / "model-store" / p.name)
    (out / "config" / "config.properties").write_text(config_properties(infos, protocol))
    isvc_name = (name or infos[0].name).lower().replace("_", "-")
    isvc = inference_service(isvc_name, storage_uri or f"s3://CHANGE-ME/{isvc_name}", protocol, gpus)
    path = out / "inferenceservice.yaml"
    path.write_text(yaml.safe_dump(isvc, sort_keys=False))
    return path
