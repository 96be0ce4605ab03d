"""Validate custom resources against CRD schemas kept in tests/deploy/crds (see SOURCE.md there).

kubernetes-validate checks built-in kinds but skips custom resources, so these are checked here with
jsonschema. Unknown fields are rejected (like the API server's strict field validation): every
object schema with `properties` and neither `additionalProperties` nor
`x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jsonschema

CRDS = Path(__file__).resolve().parent / "crds"
FILES = {
    ("keda.sh", "ScaledObject"): "scaledobject.json",
    ("monitoring.coreos.com", "ServiceMonitor"): "servicemonitor.json",
    ("serving.kserve.io", "InferenceService"): "inferenceservice.json.gz",
}


def _strict(schema):
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def load(group: str, kind: str) -> dict:
    path = CRDS / FILES[(group, kind)]
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError if `obj` does not match its kind's CRD schema."""
    group, _, version = obj["apiVersion"].rpartition("/")
    crd = load(group, obj["kind"])
    assert crd["version"] == version, f"{obj['kind']}: test data is for {crd['version']}, object is {version}"
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    schema = _strict(crd["openAPIV3Schema"])
    schema.get("properties", {}).pop("metadata", None)
    schema.get("properties", {}).pop("apiVersion", None)
    schema.get("properties", {}).pop("kind", None)
    jsonschema.validate(body, schema)
