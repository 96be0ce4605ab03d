"""The result-table stage (handlers/tables.py): rules CSV, pandas engine, hook, classifier end to end."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import logging
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from archiver_scripts import samples
from handlers.config import TableConfig
from handlers.errors import ConfigError, InvalidInput, ModelLoadError
from handlers.image_classifier import ImageClassifier
from handlers.tables import TableRules, TableStage, load_rules, load_table_stage, parse_rules, resolve_engine
from handlers.tasks.detector import ObjectDetector
from handlers.testing import FakeContext, json_request, raw_request, run_handler
from tests import detection_models

HEADER = "label,min_score,rename,action\n"


def stage(rules: str = "", engine: str = "pandas", counts: bool = True) -> TableStage:
    parsed = parse_rules(HEADER + rules) if rules else TableRules()
    return TableStage(resolve_engine(engine, "cpu"), parsed, counts=counts)


def det(class_id: int, label: str, score: float, box=(10.0, 20.0, 30.0, 40.0)) -> dict:
    return {"class_id": class_id, "label": label, "score": score, "box": list(box)}


def detections(*entries: dict, size=(640, 480)) -> dict:
    return {"detections": list(entries), "image_size": list(size)}


def labels_of(result: dict, key: str = "detections") -> list[str]:
    return [e["label"] for e in result[key]]


# --- rules CSV ---------------------------------------------------------------------------------


def test_rules_parse_with_any_column_order_comments_and_bom(tmp_path):
    path = tmp_path / "my_rules.csv"
    path.write_text(
        "\ufeff# detector rules\naction, Label ,min_score\n\nallow,car,0.5\ndeny,dog,\n,*,0.3\n",
        encoding="utf-8",
    )
    rules = load_rules(path)
    assert [(r.label, r.min_score, r.rename, r.action, r.line) for r in rules.rules] == [
        ("car", 0.5, "", "allow", 4), ("dog", None, "", "deny", 5), ("*", 0.3, "", "", 6),
    ]
    assert rules.allowed == ["car"] and rules.denied == ["dog"] and rules.default_min_score == 0.3
    assert rules.source == "my_rules.csv"


@pytest.mark.parametrize("text,where", [
    ("label,score\n", "line 1, column 2: unknown column 'score'"),
    ("label,action,label\n", "line 1, column 3: column 'label' appears twice"),
    ("min_score,action\n", "line 1: the header has no 'label' column"),
    (HEADER + "car,0.5,,\n,0.2,,\n", "line 3, column label: empty"),
    (HEADER + "car,high,,\n", "line 2, column min_score: 'high' is not a number"),
    (HEADER + "car,1.5,,\n", "line 2, column min_score: 1.5 is outside 0..1"),
    (HEADER + "car,,,keep\n", "line 2, column action: 'keep' is not allow, deny or empty"),
    (HEADER + "car,0.5,,,extra\n", "line 2: 5 values for 4 columns"),
    (HEADER + "car,0.5,,\n# note\ncar,0.2,,\n", "line 4, column label: 'car' already has a rule on line 2"),
    (HEADER + "*,0.2,thing,\n", "line 2, column rename: the * row only sets a default min_score"),
    (HEADER + "car,,auto,\nauto,,vehicle,\n", "line 2, column rename: 'auto' is itself renamed on line 3"),
    ("# only a comment\n", "no header row"),
])
def test_rules_errors_name_file_line_and_column(text, where):
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "rules.csv")
    assert str(info.value).startswith("rules.csv")
    assert where in str(info.value)


def test_rules_file_errors_name_the_file(tmp_path):
    path = tmp_path / "thresholds.csv"
    path.write_text(HEADER + "car,2,,\n")
    with pytest.raises(ConfigError, match=r"^thresholds\.csv line 2, column min_score"):
        load_rules(path)


# --- rules applied -------------------------------------------------------------------------------


def test_min_scores_per_label_and_default():
    results = [detections(det(3, "car", 0.9), det(3, "car", 0.45), det(1, "person", 0.25),
                          det(1, "person", 0.15), det(2, "dog", 0.31), det(2, "dog", 0.29))]
    out = stage("car,0.5,,\nperson,0.2,,\n*,0.3,,\n").apply(results)
    assert [(e["label"], e["score"]) for e in out[0]["detections"]] == [
        ("car", 0.9), ("person", 0.25), ("dog", 0.31)]


def test_min_score_is_inclusive():
    out = stage("car,0.5,,\n").apply([detections(det(3, "car", 0.5), det(3, "car", 0.4999))])
    assert [e["score"] for e in out[0]["detections"]] == [0.5]


def test_renames_merge_in_counts_and_rules_match_the_model_label():
    results = [detections(det(3, "car", 0.9), det(8, "truck", 0.8), det(1, "person", 0.7),
                          det(8, "truck", 0.6))]
    # min_score names the model's label (truck), not the new one (vehicle)
    out = stage("car,,vehicle,\ntruck,0.65,vehicle,\n").apply(results)
    assert labels_of(out[0]) == ["vehicle", "vehicle", "person"]
    assert [e["class_id"] for e in out[0]["detections"]] == [3, 8, 1]
    assert out[0]["counts"] == {"vehicle": 2, "person": 1}


def test_allow_list_passes_only_allowed_labels():
    results = [detections(det(3, "car", 0.9), det(1, "person", 0.8), det(2, "dog", 0.7), det(4, "cat", 0.6))]
    out = stage("person,,,allow\ncat,,,allow\n").apply(results)
    assert labels_of(out[0]) == ["person", "cat"]


def test_deny_list_drops_denied_labels():
    results = [detections(det(3, "car", 0.9), det(1, "person", 0.8), det(2, "dog", 0.7))]
    out = stage("dog,,,deny\n").apply(results)
    assert labels_of(out[0]) == ["car", "person"]
    assert out[0]["counts"] == {"car": 1, "person": 1}


def test_counts_are_per_item_sorted_by_count_then_label_and_can_be_turned_off():
    results = [detections(det(1, "b", 0.9), det(0, "a", 0.8), det(2, "c", 0.7), det(2, "c", 0.6)),
               detections(det(0, "a", 0.5))]
    out = stage().apply(results)
    assert list(out[0]["counts"].items()) == [("c", 2), ("a", 1), ("b", 1)]
    assert out[1]["counts"] == {"a": 1}
    assert "counts" not in stage(counts=False).apply(results)[0]


def test_without_rules_and_counts_the_results_come_back_equal():
    results = [detections(det(3, "car", 0.91234), det(1, "person", 0.5, (0.5, 1.25, 639.0, 479.5))),
               {"predictions": [{"index": 7, "label": "class_7", "probability": 0.612345}]},
               detections()]
    before = copy.deepcopy(results)
    out = stage(counts=False).apply(results)
    assert out == before
    assert results == before  # the input is not modified


def test_order_preserved_with_errors_and_other_results_interleaved():
    bad = InvalidInput("corrupt image")
    other = {"embedding": [0.1, 0.2]}
    results = [bad, detections(det(2, "dog", 0.7), det(3, "car", 0.6)), other,
               detections(det(3, "car", 0.2), det(1, "person", 0.95)), bad]
    out = stage("car,0.5,,\n").apply(results)
    assert out[0] is bad and out[4] is bad and out[2] is other
    assert labels_of(out[1]) == ["dog", "car"] and labels_of(out[3]) == ["person"]
    assert [e["score"] for e in out[3]["detections"]] == [0.95]
    assert out[3]["image_size"] == [640, 480] and list(out[3]) == ["detections", "image_size", "counts"]


def test_a_batch_of_errors_only_passes_through():
    results = [InvalidInput("a"), InvalidInput("b")]
    assert stage("car,0.5,,\n").apply(results) == results


def test_classifier_predictions_use_class_id_and_score_columns():
    seen = {}

    def hook(df):
        seen["columns"] = list(df.columns)
        return df[df["class_id"] != 4]

    results = [{"predictions": [{"index": 4, "label": "class_4", "probability": 0.7},
                                {"index": 2, "label": "class_2", "probability": 0.2}]}]
    out = stage("class_2,,two,\n").apply(results, hook)
    assert seen["columns"] == ["item", "class_id", "label", "score"]
    assert out == [{"predictions": [{"index": 2, "label": "two", "probability": 0.2}], "counts": {"two": 1}}]


# --- the hook ------------------------------------------------------------------------------------


class BoxArea:
    """A postprocess_table written with the pandas API only: add a column, filter on it, re-sort."""

    def postprocess_table(self, df):
        df = df.assign(area=(df["x2"] - df["x1"]) * (df["y2"] - df["y1"]))
        df = df[df["area"] >= 100.0]
        return df.sort_values(["item", "area"], ascending=[True, False])


def test_hook_adds_columns_filters_and_orders_rows():
    results = [detections(det(1, "person", 0.9, (0, 0, 10, 10)), det(2, "dog", 0.8, (0, 0, 5, 5)),
                          det(3, "car", 0.7, (0, 0, 20, 20))),
               detections(det(3, "car", 0.3, (0, 0, 1, 1)))]
    out = stage("person,,human,\n").apply(results, BoxArea().postprocess_table)
    assert out[0]["detections"] == [
        {"class_id": 3, "label": "car", "score": 0.7, "box": [0.0, 0.0, 20.0, 20.0], "area": 400.0},
        {"class_id": 1, "label": "human", "score": 0.9, "box": [0.0, 0.0, 10.0, 10.0], "area": 100.0},
    ]
    assert out[0]["counts"] == {"car": 1, "human": 1}
    assert out[1]["detections"] == [] and out[1]["counts"] == {}


def test_hook_sees_the_columns_even_when_the_batch_has_no_entries():
    out = stage().apply([detections(), InvalidInput("x")], BoxArea().postprocess_table)
    assert out[0] == {"detections": [], "image_size": [640, 480], "counts": {}}


@pytest.mark.parametrize("hook,message", [
    (lambda df: df.drop(columns=["item"]), "dropped the 'item' column"),
    (lambda df: df.assign(item=df["item"] + 5), "not results of this batch"),
    (lambda df: df["label"].tolist(), "must return a DataFrame, got list"),
    (lambda df: df.drop(columns=["label"]), "needs the 'label' column"),
])
def test_a_broken_hook_fails_with_a_clear_message(hook, message):
    with pytest.raises(RuntimeError, match=message):
        stage().apply([detections(det(3, "car", 0.9))], hook)


@pytest.mark.parametrize("entry,message", [
    ({"class_id": 1, "label": "a", "score": 0.5, "box": [1, 2, 3]}, r"'box' must be \[x1, y1, x2, y2\]"),
    ({"class_id": 1, "label": "a", "score": 0.5, "mask": {"counts": "x"}}, "entry 'mask' holds a dict"),
])
def test_entries_that_cannot_become_columns_are_named(entry, message):
    with pytest.raises(RuntimeError, match=message):
        stage().apply([detections(entry)])


def test_missing_values_from_a_hook_become_null():
    def hook(df):
        return df.assign(note=df["score"].where(df["score"] > 0.5))

    out = stage(counts=False).apply([detections(det(3, "car", 0.9), det(1, "person", 0.4))], hook)
    assert [e["note"] for e in out[0]["detections"]] == [0.9, None]


# --- engines and loading ----------------------------------------------------------------------


def test_pandas_and_auto_on_cpu_are_the_same_engine_and_give_the_same_results():
    results = [InvalidInput("bad"), detections(det(3, "car", 0.9), det(8, "truck", 0.3), det(2, "dog", 0.6)),
               detections(det(1, "person", 0.55, (1.5, 2.5, 3.5, 4.5)))]
    rules = "car,,vehicle,\ntruck,,vehicle,\ndog,,,deny\n*,0.5,,\n"
    forced, auto = stage(rules, "pandas"), stage(rules, "auto")
    assert forced.engine.name == auto.engine.name == "pandas"
    hook = BoxArea().postprocess_table
    assert forced.apply(results, hook) == auto.apply(results, hook)
    assert labels_of(forced.apply(results)[1]) == ["vehicle"]


def test_engine_choice_and_errors():
    assert resolve_engine("auto", "cpu").name == "pandas"
    with pytest.raises(ConfigError, match="cudf needs a GPU worker, this one runs on cpu"):
        resolve_engine("cudf", "cpu")
    with pytest.raises(ConfigError, match="'polars' is not one of auto, pandas, cudf"):
        resolve_engine("polars", "cpu")


class FakeCudf(types.ModuleType):
    """Stands in for cudf to test engine choice and the upload/download plumbing on a CPU host."""

    def __init__(self):
        super().__init__("cudf")
        self.__spec__ = importlib.machinery.ModuleSpec("cudf", None)
        self.uploads = 0
        fake = self

        class DataFrame(pd.DataFrame):
            @classmethod
            def from_pandas(cls, frame):
                fake.uploads += 1
                return cls(frame)

            def to_pandas(self):
                return pd.DataFrame(self)

        self.DataFrame = DataFrame


def test_auto_picks_cudf_on_a_gpu_worker_where_it_imports(monkeypatch):
    fake = FakeCudf()
    monkeypatch.setitem(sys.modules, "cudf", fake)
    assert resolve_engine("auto", "cpu").name == "pandas"  # never cudf on a CPU worker
    engine = resolve_engine("auto", "cuda")
    assert engine.name == "cudf" and engine.module is fake
    results = [detections(det(3, "car", 0.9), det(2, "dog", 0.6))]
    cudf_out = TableStage(engine, parse_rules(HEADER + "dog,,,deny\n")).apply(results)
    assert fake.uploads == 1
    assert cudf_out == stage("dog,,,deny\n").apply(results)


def test_without_cudf_auto_falls_back_and_cudf_names_the_extra(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cudf", None)  # import cudf -> ImportError
    assert resolve_engine("auto", "cuda").name == "pandas"
    with pytest.raises(ModelLoadError, match=r"pip install 'torchserve-gpu-handlers\[cudf\]'"):
        resolve_engine("cudf", "cuda")
    # installed but broken (e.g. no driver): auto serves with pandas and says why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: importlib.machinery.ModuleSpec(name, None))
    assert resolve_engine("auto", "cuda").name == "pandas"
    assert "cudf is installed but failed to import" in caplog.text


def test_load_table_stage_from_config(tmp_path):
    assert load_table_stage(TableConfig(), tmp_path, "cpu") is None
    with pytest.raises(ConfigError, match="handler.table.enabled is false"):
        load_table_stage(TableConfig(rules="rules.csv"), tmp_path, "cpu")
    with pytest.raises(ConfigError, match="'rules.csv' is not in the archive.*--extra-files rules.csv"):
        load_table_stage(TableConfig(enabled=True, rules="rules.csv"), tmp_path, "cpu")
    (tmp_path / "rules.csv").write_text(HEADER + "car,0.5,,\n")
    loaded = load_table_stage(TableConfig(enabled=True, rules="rules.csv", counts=False), tmp_path, "cpu")
    assert loaded.engine.name == "pandas" and not loaded.counts
    assert [r.label for r in loaded.rules.rules] == ["car"]


@pytest.mark.gpu
def test_cudf_engine_gives_the_same_results_as_pandas():
    pytest.importorskip("cudf")
    results = [detections(det(3, "car", 0.9), det(8, "truck", 0.3), det(2, "dog", 0.6),
                          det(1, "person", 0.55, (1.5, 2.5, 3.5, 4.5))),
               InvalidInput("bad"), detections(),
               detections(det(8, "truck", 0.7, (0, 0, 100, 50)), det(8, "truck", 0.71))]
    rules = parse_rules(HEADER + "car,,vehicle,\ntruck,0.5,vehicle,\ndog,,,deny\n*,0.5,,\n")
    gpu = TableStage(resolve_engine("cudf", "cuda"), rules)
    cpu = TableStage(resolve_engine("pandas", "cuda"), rules)
    assert gpu.engine.name == "cudf" and resolve_engine("auto", "cuda").name == "cudf"
    hook = BoxArea().postprocess_table
    assert gpu.apply(results, hook) == cpu.apply(results, hook)
    assert gpu.apply(results) == cpu.apply(results)


# --- the classifier end to end ------------------------------------------------------------------


class AreaOfInterest(ImageClassifier):
    """A user's subclass: drop one class in postprocess_table (pandas API)."""

    dropped_index = -1

    def postprocess_table(self, df):
        return df[df["class_id"] != self.dropped_index]


@pytest.fixture(scope="module")
def images():
    photos = samples.photos()
    return [samples.encode(photos[name], "JPEG", quality=90) for name in sorted(photos)[:4]]


def run_classifier(model_dir, images, table=None, cls=ImageClassifier, **attrs):
    config = {"classifier": {"top_k": 5}, **({"table": table} if table else {})}
    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config=config, batch_size=8)
    handler = cls()
    for name, value in attrs.items():
        setattr(handler, name, value)
    handler.initialize(ctx)
    requests = [raw_request(images[0]), json_request({"data": "%%%"}), *map(raw_request, images[1:])]
    return run_handler(handler, ctx, requests)


def test_classifier_applies_the_archive_rules_and_the_hook(model_dir, images, tmp_path):
    baseline = run_classifier(model_dir, images)
    assert [r.status for r in baseline] == [200, 400, 200, 200, 200]
    preds = [r.body["predictions"] if r.status == 200 else None for r in baseline]
    every = [p for p_list in preds if p_list for p in p_list]
    denied = preds[0][0]["label"]
    min_score = sorted(p["probability"] for p in every)[len(every) // 3]  # a value that occurs: inclusive
    # the hook drops a class that the third request keeps after the rules
    dropped_index = next(p["index"] for p in preds[2] if p["label"] != denied and p["probability"] >= min_score)
    renamed = next(p["label"] for p in every
                   if p["label"] != denied and p["index"] != dropped_index and p["probability"] >= min_score)
    archive = tmp_path / "archive"
    shutil.copytree(model_dir, archive)
    (archive / "rules.csv").write_text(HEADER + f"{denied},,,deny\n{renamed},,renamed,\n*,{min_score!r},,\n")

    table = {"enabled": True, "rules": "rules.csv", "engine": "pandas"}
    served = run_classifier(archive, images, table, AreaOfInterest, dropped_index=dropped_index)

    assert [r.status for r in served] == [200, 400, 200, 200, 200]
    assert served[1].body == baseline[1].body
    for before, after in zip(preds, served, strict=True):
        if before is None:
            continue
        expected = [
            {**p, "label": "renamed" if p["label"] == renamed else p["label"]}
            for p in before
            if p["label"] != denied and p["probability"] >= min_score and p["index"] != dropped_index
        ]
        assert after.body["predictions"] == expected
        assert list(after.body["counts"].items()) == sorted((e["label"], 1) for e in expected)
    # each rule did something on this data (the test would pass vacuously otherwise)
    kept = [e for r in served if r.status == 200 for e in r.body["predictions"]]
    assert any(p["probability"] < min_score for p in every) and any(p["label"] == denied for p in every)
    assert len(kept) < len(every)
    assert any(e["label"] == "renamed" for e in kept)


class Exclaims(ImageClassifier):
    """A hook that marks every label each time it runs: run twice, a label would get two marks."""

    def postprocess_table(self, df):
        return df.assign(label=df["label"] + "!")


class CallsApplyTable(Exclaims):
    """A subclass written when tasks called the table stage themselves, at the end of postprocess."""

    def postprocess(self, outputs, geometry):
        return self.apply_table(super().postprocess(outputs, geometry))


def test_the_table_stage_runs_once_after_postprocess_even_when_a_subclass_calls_it(model_dir, images, caplog):
    table = {"enabled": True, "engine": "pandas"}
    plain = run_classifier(model_dir, images, table, Exclaims)
    with caplog.at_level(logging.WARNING, logger="handlers.base"):
        legacy = run_classifier(model_dir, images, table, CallsApplyTable)
    assert [r.status for r in plain] == [200, 400, 200, 200, 200]
    assert [r.body for r in legacy] == [r.body for r in plain]
    labels = [p["label"] for r in plain if r.status == 200 for p in r.body["predictions"]]
    assert len(labels) == 20 and all(label.endswith("!") and not label.endswith("!!") for label in labels)
    assert sum("calls apply_table" in m for m in caplog.messages) == 1  # warned once, at warm-up


def test_classifier_load_fails_on_a_bad_rules_file_or_a_broken_hook(model_dir, images, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(model_dir, archive)
    (archive / "rules.csv").write_text(HEADER + "class_1,often,,\n")
    table = {"enabled": True, "rules": "rules.csv"}
    with pytest.raises(ConfigError, match="rules.csv line 2, column min_score: 'often'"):
        run_classifier(archive, images, table)

    class Broken(ImageClassifier):
        def postprocess_table(self, df):
            return df.drop(columns=["item"])

    with pytest.raises(RuntimeError, match="dropped the 'item' column"):  # warm-up runs the hook
        run_classifier(model_dir, images, {"enabled": True}, Broken)


# --- the detector end to end --------------------------------------------------------------------


def red_rectangle_jpeg(box: tuple[int, int, int, int], size=(400, 300)) -> bytes:
    image = np.full((size[1], size[0], 3), 128, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = (255, 0, 0)
    return samples.encode(image, "JPEG", quality=95)


def test_detector_applies_rules_hook_and_counts(tmp_path):
    seen = []

    class LargeDefects(ObjectDetector):
        def postprocess_table(self, df):
            df = df.assign(area=(df["x2"] - df["x1"]) * (df["y2"] - df["y1"]))
            seen.append(df)
            return df[df["area"] >= 1000.0]

    shutil.copy(detection_models.__file__, tmp_path / "red_box.py")
    (tmp_path / "index_to_name.json").write_text(json.dumps({"0": "person", "1": "bicycle", "2": "red_box"}))
    (tmp_path / "rules.csv").write_text(HEADER + "red_box,,defect,allow\n*,0.5,,\n")
    torch.save({}, tmp_path / "weights.pt")
    config = {"model": {"file": "weights.pt", "format": "eager", "model_class": "red_box.py:RedBoxXyxy"},
              "preprocess": {"backend": "cpu"}, "table": {"enabled": True, "rules": "rules.csv"}}
    ctx = FakeContext(tmp_path, handler_config=config, batch_size=4)
    handler = LargeDefects()
    handler.initialize(ctx)
    big, small = red_rectangle_jpeg((50, 60, 250, 200)), red_rectangle_jpeg((10, 10, 30, 30))
    responses = run_handler(handler, ctx, [raw_request(big), raw_request(big[: len(big) // 2]), raw_request(small)])

    assert [r.status for r in responses] == [200, 400, 200]
    [found] = responses[0].body["detections"]
    assert (found["class_id"], found["label"], found["score"]) == (2, "defect", 0.9)
    x1, y1, x2, y2 = found["box"]
    assert max(abs(a - b) for a, b in zip(found["box"], (50, 60, 250, 200), strict=True)) < 3
    assert found["area"] == pytest.approx((x2 - x1) * (y2 - y1))
    assert responses[0].body["counts"] == {"defect": 1} and responses[0].body["image_size"] == [400, 300]
    # the small rectangle is found by the model (the hook saw it) but dropped by the hook
    assert seen[-1]["item"].tolist() == [0, 1] and seen[-1]["label"].tolist() == ["defect", "defect"]
    assert responses[2].body == {"detections": [], "image_size": [400, 300], "counts": {}}
