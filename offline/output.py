"""The Parquet parts' schema: five columns for every task, then typed columns parsed from `response`.

    uri            string   the input (path, URL, or "<file>#<line>")
    status         int32    the HTTP status the server would give (0: the input never reached it)
    error_type     string   null on 200; the error body's "type" (InvalidInput, PayloadTooLarge...)
    error_message  string   null on 200; the error body's "message"
    response       string   the exact body the server would send

Typed columns, per task (null on error rows, and on a 200 whose body is not the task's shape):

    image-classification   predictions: list<struct<index: int64, label: string, probability: double>>
    object-detection       image_size: fixed_size_list<int32>[2] (width, height),
                           detections: list<struct<class_id: int64, label: string, score: double,
                                                   box: fixed_size_list<float32>[4]>> (x1, y1, x2, y2)
    semantic-segmentation  image_size, segments: list<struct<class_id: int64, label: string, area: int64,
                           mask: struct<size: fixed_size_list<int32>[2], counts: string>>> (COCO
                           compressed RLE, `pycocotools.mask.decode({"size": size, "counts": counts})`);
                           with `segmenter.output: png`, label_map_png: binary (mask null in segments)
    image-embedding        embedding: fixed_size_list<float32>[dim] (float16 when embedder.dtype is
                           float16), from the list or the base64 encoding alike

The columns are parsed from the response text, not taken from the handler, so they say exactly
what the server would have said. A task without an entry in `TASK_COLUMNS` gets the five columns
only; `register_task_columns` adds one (video archives, one row per clip, register theirs the same
way: parse one clip's response into columns).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from .worker import RowResult

logger = logging.getLogger(__name__)

#: Parsed JSON body -> {column: value} (raise KeyError/TypeError/ValueError when not the task's shape).
Parser = Callable[[Any, "TaskInfo"], dict[str, Any]]


@dataclass(frozen=True)
class TaskInfo:
    """What the schema depends on: the task and, for embeddings, the vector's dtype and length."""

    task: str = ""
    embedding_dtype: str | None = None
    embedding_dim: int | None = None


@dataclass(frozen=True)
class TaskColumns:
    """A task's typed columns: the fields (given the TaskInfo) and the parser of one body."""

    fields: Callable[[TaskInfo], list[pa.Field]]
    parse: Parser


def common_fields() -> list[pa.Field]:
    import pyarrow as pa

    return [pa.field("uri", pa.string(), nullable=False), pa.field("status", pa.int32(), nullable=False),
            pa.field("error_type", pa.string()), pa.field("error_message", pa.string()),
            pa.field("response", pa.string(), nullable=False)]


def _box_type() -> pa.DataType:
    import pyarrow as pa

    return pa.list_(pa.float32(), 4)


def _size_type() -> pa.DataType:
    import pyarrow as pa

    return pa.list_(pa.int32(), 2)


def _classification_fields(info: TaskInfo) -> list[pa.Field]:
    import pyarrow as pa

    item = pa.struct([("index", pa.int64()), ("label", pa.string()), ("probability", pa.float64())])
    return [pa.field("predictions", pa.list_(item))]


def _classification(body: Any, info: TaskInfo) -> dict[str, Any]:
    return {"predictions": [{"index": int(p["index"]), "label": str(p["label"]), "probability": float(p["probability"])}
                            for p in body["predictions"]]}


def _detection_fields(info: TaskInfo) -> list[pa.Field]:
    import pyarrow as pa

    item = pa.struct([("class_id", pa.int64()), ("label", pa.string()), ("score", pa.float64()),
                      ("box", _box_type())])
    return [pa.field("image_size", _size_type()), pa.field("detections", pa.list_(item))]


def _pair(value: Any) -> list[int]:
    pair = [int(v) for v in value]
    if len(pair) != 2:
        raise ValueError(f"expected [width, height], got {value!r}")
    return pair


def _detection(body: Any, info: TaskInfo) -> dict[str, Any]:
    detections = []
    for d in body["detections"]:
        box = [float(v) for v in d["box"]]
        if len(box) != 4:
            raise ValueError(f"expected a 4-number box, got {d['box']!r}")
        detections.append({"class_id": int(d["class_id"]), "label": str(d["label"]), "score": float(d["score"]),
                           "box": box})
    return {"image_size": _pair(body["image_size"]), "detections": detections}


def _segmentation_fields(info: TaskInfo) -> list[pa.Field]:
    import pyarrow as pa

    mask = pa.struct([("size", _size_type()), ("counts", pa.string())])
    item = pa.struct([("class_id", pa.int64()), ("label", pa.string()), ("area", pa.int64()), ("mask", mask)])
    return [pa.field("image_size", _size_type()), pa.field("segments", pa.list_(item)),
            pa.field("label_map_png", pa.binary())]


def _segmentation(body: Any, info: TaskInfo) -> dict[str, Any]:
    png = body.get("label_map_png")
    entries = body["classes"] if png is not None else body["segments"]
    segments = []
    for s in entries:
        mask = s.get("mask")
        segments.append({"class_id": int(s["class_id"]), "label": str(s["label"]), "area": int(s["area"]),
                         "mask": None if mask is None else {"size": _pair(mask["size"]), "counts": str(mask["counts"])}})
    return {"image_size": _pair(body["image_size"]), "segments": segments,
            "label_map_png": None if png is None else base64.b64decode(png, validate=True)}


def _embedding_fields(info: TaskInfo) -> list[pa.Field]:
    import pyarrow as pa

    value = pa.float16() if info.embedding_dtype == "float16" else pa.float32()
    if info.embedding_dim is None:  # no vector seen yet: still typed, of unknown length
        return [pa.field("embedding", pa.list_(value))]
    return [pa.field("embedding", pa.list_(value, info.embedding_dim))]


def _embedding(body: Any, info: TaskInfo) -> dict[str, Any]:
    import numpy as np

    dtype = np.float16 if info.embedding_dtype == "float16" else np.float32
    if "embedding_b64" in body:
        little = "<f2" if body.get("dtype", info.embedding_dtype) == "float16" else "<f4"
        vector = np.frombuffer(base64.b64decode(body["embedding_b64"], validate=True), little).astype(dtype)
    else:
        vector = np.asarray(body["embedding"], dtype=np.float64).astype(dtype)
    if vector.ndim != 1 or (info.embedding_dim is not None and len(vector) != info.embedding_dim):
        raise ValueError(f"embedding of shape {vector.shape}, expected [{info.embedding_dim}]")
    return {"embedding": vector}


TASK_COLUMNS: dict[str, TaskColumns] = {
    "image-classification": TaskColumns(_classification_fields, _classification),
    "object-detection": TaskColumns(_detection_fields, _detection),
    "semantic-segmentation": TaskColumns(_segmentation_fields, _segmentation),
    "image-embedding": TaskColumns(_embedding_fields, _embedding),
}


def register_task_columns(task: str, columns: TaskColumns) -> None:
    """Add (or replace) a task's typed columns, e.g. for a video task (one row per clip)."""
    TASK_COLUMNS[task] = columns


def schema_for(info: TaskInfo, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    import pyarrow as pa

    typed = TASK_COLUMNS.get(info.task)
    fields = common_fields() + (typed.fields(info) if typed is not None else [])
    return pa.schema(fields, metadata=metadata)


def typed_values(results: Sequence[RowResult], info: TaskInfo) -> dict[str, list[Any]]:
    """The typed columns' values for these rows (None where an error row or an unparsable body)."""
    typed = TASK_COLUMNS.get(info.task)
    if typed is None:
        return {}
    names = [f.name for f in typed.fields(info)]
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for r in results:
        parsed: dict[str, Any] = {}
        if r.status == 200:
            try:
                parsed = typed.parse(json.loads(r.response), info)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                logger.warning("%s: a 200 response that is not %s's shape (%s); typed columns left null",
                               r.uri, info.task, exc)
        for name in names:
            columns[name].append(parsed.get(name))
    return columns


def to_table(results: Sequence[RowResult], info: TaskInfo, metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """Rows -> an Arrow table with `schema_for(info)`."""
    import pyarrow as pa

    schema = schema_for(info, metadata)
    data: dict[str, Any] = {
        "uri": [r.uri for r in results], "status": [r.status for r in results],
        "error_type": [r.error_type for r in results], "error_message": [r.error_message for r in results],
        "response": [r.response for r in results],
    }
    data.update(typed_values(results, info))
    arrays = []
    for f in schema:
        values = data[f.name]
        if f.name == "embedding":
            arrays.append(_embedding_array(values, f.type))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _embedding_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """Vectors (numpy, or None) -> a (fixed-size) list array of float16/float32, built from numpy:
    pyarrow does not convert Python floats to float16."""
    import numpy as np
    import pyarrow as pa

    value_type = type_.value_type
    np_type = np.float16 if value_type == pa.float16() else np.float32
    mask = np.array([v is None for v in values], dtype=bool)
    if isinstance(type_, pa.FixedSizeListType):
        dim = type_.list_size
        flat = np.concatenate([np.zeros(dim, np_type) if v is None else np.asarray(v, np_type) for v in values]) \
            if values else np.zeros(0, np_type)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), dim, mask=pa.array(mask))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    pieces = []
    for i, v in enumerate(values):
        n = 0 if v is None else len(v)
        offsets[i + 1] = offsets[i] + n
        if v is not None:
            pieces.append(np.asarray(v, np_type))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np_type)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type), mask=pa.array(mask))
