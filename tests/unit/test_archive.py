"""`tsgpu archive`: archive layout, generated config, validation at build time, CLI errors."""

from __future__ import annotations

import argparse
import ast
import json
import zipfile

import numpy as np
import pytest
import yaml

from archiver_scripts import samples
from archiver_scripts.archive import TASKS, ArchiveError, build_archive
from archiver_scripts.cli import COMMANDS, build_parser, main
from handlers.errors import ConfigError
from tests import models
from tests.models import TAGGER, tagger_model


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    model = models.make_model()
    return {
        "script": models.save_torchscript(model, d / "tiny.pt"),
        "weights": models.save_state_dict(model, d / "weights.pt"),
        "model_py": models.write_model_py(d),
        "labels": models.write_labels(d),
        "dir": d,
    }


def read(mar, name):
    with zipfile.ZipFile(mar) as zf:
        return zf.read(name).decode()


def test_archive_layout_and_generated_config(artifacts, tmp_path):
    mar = build_archive("tiny", artifacts["script"], tmp_path, labels=artifacts["labels"], batch_size=16,
                        max_batch_delay=25, workers=3, config=["classifier.top_k=2", "preprocess.jpeg_draft=false"],
                        log=quiet)
    assert mar == tmp_path / "tiny.mar"
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
    assert {"tiny.pt", "index_to_name.json", "model-config.yaml", "tsgpu_entry.py", "MAR-INF/MANIFEST.json",
            "handlers/__init__.py", "handlers/base.py", "handlers/preprocess/cpu.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    manifest = json.loads(read(mar, "MAR-INF/MANIFEST.json"))["model"]
    assert manifest["serializedFile"] == "tiny.pt" and manifest["handler"] == "tsgpu_entry.py"
    assert manifest["configFile"] == "model-config.yaml"
    cfg = yaml.safe_load(read(mar, "model-config.yaml"))
    assert cfg["minWorkers"] == cfg["maxWorkers"] == 3
    assert cfg["batchSize"] == 16 and cfg["maxBatchDelay"] == 25
    assert cfg["handler"] == {"model": {"file": "tiny.pt"}, "classifier": {"top_k": 2}, "preprocess": {"jpeg_draft": False}}
    assert json.loads(read(mar, "index_to_name.json")) == models.LABELS


def test_entry_file_defines_exactly_one_class(artifacts, tmp_path):
    mar = build_archive("tiny", artifacts["script"], tmp_path, log=quiet)
    tree = ast.parse(read(mar, "tsgpu_entry.py"))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["Handler"]  # TorchServe's loader needs exactly one class defined in the module
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert any(n.module == "handlers.tasks.classifier" and n.names[0].name == "ImageClassifier" for n in imports)


def test_eager_model_class_is_packed(artifacts, tmp_path):
    mar = build_archive("eager", artifacts["weights"], tmp_path, model_class=f"{artifacts['model_py']}:TinyClassifier", log=quiet)
    cfg = yaml.safe_load(read(mar, "model-config.yaml"))
    assert cfg["handler"]["model"] == {"file": "weights.pt", "format": "eager", "model_class": "model.py:TinyClassifier"}
    assert "class TinyClassifier" in read(mar, "model.py")


def test_custom_handler_class(artifacts, tmp_path):
    module = tmp_path / "my_task.py"
    module.write_text("from handlers.image_classifier import ImageClassifier\n\nclass Mine(ImageClassifier):\n    pass\n")
    mar = build_archive("mine", artifacts["script"], tmp_path / "out", handler_class="my_task:Mine", extra_files=[module], log=quiet)
    assert "from my_task import Mine as _Base" in read(mar, "tsgpu_entry.py")
    assert "class Mine" in read(mar, "my_task.py")


def test_a_users_handler_is_validated_with_its_own_config_class(tmp_path, capsys):
    weights, model_py = tagger_model(tmp_path)
    common = ["--model", str(weights), "--model-class", f"{model_py}:ConstTags", "--export-path", str(tmp_path / "store"),
              "--handler-class", "multilabel_tagger:MultiLabelTagger", "--extra-files", str(TAGGER)]
    assert main(["archive", "--name", "tagger", "--config", "tagger.threshold=0.7", *common]) == 0
    mar = tmp_path / "store" / "tagger.mar"
    section = yaml.safe_load(read(mar, "model-config.yaml"))["handler"]
    assert section["tagger"] == {"threshold": 0.7}
    assert section["preprocess"] == {"geometry": "stretch", "input_size": 224}  # the class's task_defaults
    assert "class MultiLabelTagger" in read(mar, "multilabel_tagger.py")
    capsys.readouterr()
    # Still strict: an unknown key of the user's own section, and a bad value, are refused by name.
    assert main(["archive", "--name", "t2", "--config", "tagger.treshold=0.7", *common]) == 2
    assert "handler.tagger: unknown key 'treshold'; known keys: max_tags, threshold" in capsys.readouterr().err
    assert main(["archive", "--name", "t3", "--config", "tagger.threshold=1.5", *common]) == 2
    assert "handler.tagger.threshold: must be within 0..1, got 1.5" in capsys.readouterr().err
    with pytest.raises(ArchiveError, match=r"no multilabel_tagger\.py in --extra-files"):
        build_archive("t4", weights, tmp_path / "store", model_class=f"{model_py}:ConstTags",
                      handler_class="multilabel_tagger:MultiLabelTagger", log=quiet)
    with pytest.raises(ArchiveError, match=r"multilabel_tagger has no VisionHandler subclass named Tagger"):
        build_archive("t5", weights, tmp_path / "store", model_class=f"{model_py}:ConstTags",
                      handler_class="multilabel_tagger:Tagger", extra_files=[TAGGER], log=quiet)


def test_a_new_task_is_one_module_plus_its_registration(tmp_path, monkeypatch):
    from handlers import tasks
    from handlers.testing import FakeContext, raw_request, run_handler

    monkeypatch.syspath_prepend(str(TAGGER.parent))
    monkeypatch.setitem(tasks.TASK_HANDLERS, "image-tagging", "multilabel_tagger:MultiLabelTagger")
    weights, model_py = tagger_model(tmp_path)
    (tmp_path / "tags.json").write_text(json.dumps({"0": "red", "1": "blue", "2": "green"}))
    (tmp_path / "rules.csv").write_text("label,min_score,rename,action\nred,,crimson,\n")
    assert main(["archive", "--name", "tagger", "--task", "image-tagging", "--model", str(weights),
                 "--model-class", f"{model_py}:ConstTags", "--labels", str(tmp_path / "tags.json"),
                 "--config", "tagger.threshold=0.6", "--config", "table.enabled=true", "--config", "table.rules=rules.csv",
                 "--extra-files", str(TAGGER), "--extra-files", str(tmp_path / "rules.csv"),
                 "--export-path", str(tmp_path / "store")]) == 0
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(tmp_path / "store" / "tagger.mar").extractall(unpacked)
    handler_config = yaml.safe_load((unpacked / "model-config.yaml").read_text())["handler"]
    handler_class = tasks.task_handler("image-tagging")
    ctx = FakeContext(unpacked, handler_config=handler_config, batch_size=2)
    handler = handler_class()
    handler.initialize(ctx)
    jpeg = samples.encode(np.full((48, 64, 3), 128, np.uint8), "JPEG")
    ok, bad = run_handler(handler, ctx, [raw_request(jpeg), raw_request(b"not an image")])
    # The table stage knows the new kind from the registry: the rules file renamed 'red'.
    assert ok.status == 200 and ok.body == {
        "tags": [{"index": 0, "label": "crimson", "score": 0.880797},
                 {"index": 2, "label": "green", "score": 0.622459}],
        "counts": {"crimson": 1, "green": 1},
    }
    assert bad.status == 415


def test_bad_config_key_fails_the_build(artifacts, tmp_path):
    with pytest.raises(ConfigError, match="handler.classifier: unknown key 'topk'"):
        build_archive("tiny", artifacts["script"], tmp_path, config=["classifier.topk=3"], log=quiet)
    assert not (tmp_path / "tiny.mar").exists()


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(model="missing.pt"), "--model missing.pt: no such file"),
    (dict(name="bad name!"), "--name 'bad name!'"),
    (dict(task="segmentation-of-everything"), "--task 'segmentation-of-everything': unknown task"),
    (dict(model_class="TinyClassifier"), "expected file.py:ClassName"),
    (dict(model_class="nowhere.py:Net"), "nowhere.py does not exist"),
    (dict(handler_class="just_a_module"), "--handler-class 'just_a_module': expected module:ClassName"),
    (dict(batch_size=0), "--batch-size 0: must be positive"),
    (dict(extra_files=["/no/such/file"]), "--extra-files /no/such/file"),
])
def test_option_errors_name_the_flag(artifacts, tmp_path, kwargs, fragment):
    args = dict(name="tiny", model=artifacts["script"], export_path=tmp_path, log=quiet)
    args.update(kwargs)
    with pytest.raises(ArchiveError) as info:
        build_archive(**args)
    assert fragment in str(info.value)


def test_labels_must_be_a_json_object(artifacts, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text("[\"cat\", \"dog\"]")
    with pytest.raises(ArchiveError, match="expected a JSON object"):
        build_archive("tiny", artifacts["script"], tmp_path, labels=bad, log=quiet)


def test_existing_archive_needs_force(artifacts, tmp_path):
    build_archive("tiny", artifacts["script"], tmp_path, log=quiet)
    with pytest.raises(ArchiveError, match="already exists: pass --force"):
        build_archive("tiny", artifacts["script"], tmp_path, log=quiet)
    build_archive("tiny", artifacts["script"], tmp_path, force=True, log=quiet)


def test_cli_success_and_usage_errors(artifacts, tmp_path, capsys):
    code = main(["archive", "--name", "tiny", "--model", str(artifacts["script"]), "--labels", str(artifacts["labels"]),
                 "--config", "classifier.top_k=1", "--export-path", str(tmp_path)])
    assert code == 0 and (tmp_path / "tiny.mar").is_file()
    out = capsys.readouterr().out
    assert "[1/4]" in out and "[4/4] done" in out
    code = main(["archive", "--name", "tiny2", "--model", str(artifacts["script"]), "--config", "preprocess.crop_size=512",
                 "--export-path", str(tmp_path)])
    assert code == 2
    assert "crop_size: 512 is larger than resize_size 256" in capsys.readouterr().err


def test_help_lists_every_command_and_every_task(capsys):
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(c.name for c in COMMANDS)
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    described = top.split("TorchServe GPU handlers:")[1].split(".")[0]
    assert all(name in described for name in sub.choices), (described, list(sub.choices))
    with pytest.raises(SystemExit):
        main(["archive", "--help"])
    task_help = " ".join(capsys.readouterr().out.split())
    assert all(task in task_help for task in TASKS) and "object-detection" in task_help
    with pytest.raises(SystemExit) as exit_info:
        main(["archive", "--name", "x", "--model", "m.pt", "--export-path", "s", "--task", "detection"])
    assert exit_info.value.code == 2 and "invalid choice: 'detection'" in capsys.readouterr().err


def test_table_rules_are_checked_at_build_time(artifacts, tmp_path):
    rules = tmp_path / "rules.csv"
    rules.write_text("label,min_score\nclass_1,0.5\n")
    config = ["table.enabled=true", "table.rules=rules.csv"]
    with pytest.raises(ArchiveError, match=r"ship the file with --extra-files rules.csv"):
        build_archive("t1", artifacts["script"], tmp_path / "store", config=config, log=quiet)
    rules.write_text("label,min_score\nclass_1,high\n")
    with pytest.raises(ArchiveError, match=r"rules.csv line 2"):
        build_archive("t2", artifacts["script"], tmp_path / "store", config=config, extra_files=[rules], log=quiet)
    rules.write_text("label,min_score\nclass_1,0.5\n")
    mar = build_archive("t3", artifacts["script"], tmp_path / "store", config=config, extra_files=[rules], log=quiet)
    assert yaml.safe_load(read(mar, "model-config.yaml"))["handler"]["table"]["rules"] == "rules.csv"


def test_task_defaults_are_written_into_the_archive(artifacts, tmp_path):
    mar = build_archive("det", artifacts["script"], tmp_path / "store", task="object-detection",
                        config=["preprocess.input_size=[480,640]"], log=quiet)
    section = yaml.safe_load(read(mar, "model-config.yaml"))["handler"]
    assert section["preprocess"]["geometry"] == "letterbox" and section["preprocess"]["input_size"] == [480, 640]
    assert section["preprocess"]["mean"] == [0.0, 0.0, 0.0] and section["preprocess"]["std"] == [1.0, 1.0, 1.0]
    assert "handlers.tasks.detector" in read(mar, "tsgpu_entry.py")
