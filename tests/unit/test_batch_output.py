"""The Parquet parts' schema: common columns, typed columns per task parsed from the exact body."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the [batch] extra)")
pq = pytest.importorskip("pyarrow.parquet")

from offline.output import TaskInfo, schema_for, to_table
from offline.worker import RowResult

ERROR = RowResult("bad.jpg", 415, "unsupported_media_type", "not an image",
                  json.dumps({"code": 415, "type": "unsupported_media_type", "message": "not an image"}))


def ok(uri: str, body: dict) -> RowResult:
    return RowResult(uri, 200, None, None, json.dumps(body, separators=(",", ":")))


def roundtrip(table: pa.Table, tmp_path) -> pa.Table:
    pq.write_table(table, tmp_path / "part.parquet")
    return pq.read_table(tmp_path / "part.parquet")


def test_common_columns_keep_the_exact_body_and_error_fields(tmp_path):
    body = '{"predictions":[{"index":3,"label":"cat","probability":0.5}]}'
    rows = [RowResult("a.jpg", 200, None, None, body), ERROR, RowResult("gone.jpg", 0, "InputReadError", "missing", "")]
    table = roundtrip(to_table(rows, TaskInfo("some-unknown-task")), tmp_path)
    assert table.column_names == ["uri", "status", "error_type", "error_message", "response"]
    assert table.column("response").to_pylist()[0] == body
    assert table.column("status").to_pylist() == [200, 415, 0]
    assert table.column("error_type").to_pylist() == [None, "unsupported_media_type", "InputReadError"]


def test_classification_predictions(tmp_path):
    body = {"predictions": [{"index": 281, "label": "tabby", "probability": 0.873101},
                            {"index": 7, "label": "7", "probability": 0.1}]}
    table = roundtrip(to_table([ok("a", body), ERROR], TaskInfo("image-classification")), tmp_path)
    assert str(table.schema.field("predictions").type) == \
        "list<element: struct<index: int64, label: string, probability: double>>"
    assert table.column("predictions").to_pylist() == [body["predictions"], None]


def test_detection_boxes_are_float32_quadruples(tmp_path):
    body = {"detections": [{"class_id": 2, "label": "red", "score": 0.9, "box": [200.5, 150.25, 500.0, 400.75]}],
            "image_size": [800, 600]}
    empty = {"detections": [], "image_size": [10, 20]}
    table = roundtrip(to_table([ok("a", body), ok("b", empty), ERROR], TaskInfo("object-detection")), tmp_path)
    det_type = table.schema.field("detections").type
    assert det_type.value_type.field("box").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("image_size").type == pa.list_(pa.int32(), 2)
    df = table.to_pandas()
    assert list(df.image_size[0]) == [800, 600] and list(df.detections[1]) == [] and df.detections[2] is None
    assert list(df.detections[0][0]["box"]) == [200.5, 150.25, 500.0, 400.75]  # exact in float32


def test_segmentation_rle_and_png(tmp_path):
    from pycocotools import mask as mask_utils

    mask = np.zeros((6, 8), np.uint8, order="F")
    mask[1:4, 2:6] = 1
    rle = mask_utils.encode(mask)
    body = {"image_size": [8, 6], "segments": [{"class_id": 1, "label": "red", "area": 12,
                                                "mask": {"size": [6, 8], "counts": rle["counts"].decode()}}]}
    table = roundtrip(to_table([ok("a", body)], TaskInfo("semantic-segmentation")), tmp_path)
    (seg,) = table.column("segments").to_pylist()[0]
    decoded = mask_utils.decode({"size": seg["mask"]["size"], "counts": seg["mask"]["counts"].encode()})
    assert np.array_equal(decoded, mask) and seg["area"] == 12
    png = {"image_size": [8, 6], "label_map_png": base64.b64encode(b"\x89PNG...").decode(),
           "classes": [{"class_id": 1, "label": "red", "area": 12}]}
    row = to_table([ok("b", png)], TaskInfo("semantic-segmentation")).to_pylist()[0]
    assert row["label_map_png"] == b"\x89PNG..." and row["segments"][0]["mask"] is None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("encoding", ["list", "base64"])
def test_embedding_fixed_size_list_exact(dtype, encoding, tmp_path):
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(5).astype(dtype)
    if encoding == "list":  # the handler writes each element's exact value as a JSON double
        body = {"embedding": vector.tolist(), "dim": 5}
    else:
        little = "<f2" if dtype == "float16" else "<f4"
        body = {"embedding_b64": base64.b64encode(vector.astype(little).tobytes()).decode(), "dtype": dtype, "dim": 5}
    info = TaskInfo("image-embedding", dtype, 5)
    table = roundtrip(to_table([ok("a", body), ERROR], info), tmp_path)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    assert table.schema.field("embedding").type == pa.list_(value_type, 5)
    got = table.column("embedding").to_pylist()
    assert got[1] is None
    assert np.array_equal(np.asarray(got[0], dtype), vector)  # bit-exact
    assert np.asarray(table.to_pandas().embedding[0]).dtype == np.dtype(dtype)


def test_a_200_body_of_another_shape_leaves_typed_columns_null(caplog):
    table = to_table([ok("a", {"tags": []})], TaskInfo("image-classification"))
    assert table.column("predictions").to_pylist() == [None]
    assert "not image-classification's shape" in caplog.text


def test_schema_metadata_is_kept():
    schema = schema_for(TaskInfo("image-classification"), {b"k": b"v"})
    assert schema.metadata == {b"k": b"v"} and schema.names[:5] == ["uri", "status", "error_type", "error_message",
                                                                   "response"]
