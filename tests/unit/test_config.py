"""model-config.yaml `handler:` section: defaults, strict keys, clear messages, overrides."""

from __future__ import annotations

import pytest

from handlers.config import HandlerConfig, apply_overrides, load_handler_config
from handlers.errors import ConfigError
from handlers.tasks import TASK_HANDLERS, task_handler
from handlers.tasks.classifier import ImageClassifierConfig


def test_empty_section_gives_defaults():
    cfg = load_handler_config({"batchSize": 8}, ImageClassifierConfig)
    assert cfg == ImageClassifierConfig()
    assert cfg.preprocess.resize_size == 256 and cfg.preprocess.crop_size == 224
    assert cfg.classifier.top_k == 5 and cfg.preprocess.backend == "auto"


def test_values_are_read_and_typed():
    cfg = ImageClassifierConfig.from_mapping({
        "threads": 2,
        "preprocess": {"resize_size": 320, "crop_size": 288, "mean": [0.5, 0.5, 0.5], "draft_min_ratio": 3},
        "classifier": {"top_k": 1},
    })
    assert cfg.threads == 2 and cfg.preprocess.resize_size == 320
    assert cfg.preprocess.mean == (0.5, 0.5, 0.5) and cfg.preprocess.draft_min_ratio == 3.0
    assert cfg.classifier.top_k == 1


@pytest.mark.parametrize("section,fragments", [
    ({"preprocess": {"resize": 256}}, ["handler.preprocess", "'resize'", "resize_size"]),
    ({"topk": 3}, ["handler:", "'topk'", "classifier"]),
    ({"preprocess": {"resize_size": "big"}}, ["handler.preprocess.resize_size", "integer", "'big'"]),
    ({"preprocess": {"resize_size": True}}, ["handler.preprocess.resize_size", "integer"]),
    ({"preprocess": {"crop_size": 300}}, ["crop_size", "300", "resize_size"]),
    ({"preprocess": {"backend": "opencv"}}, ["handler.preprocess.backend", "'opencv'", "cpu"]),
    ({"preprocess": {"mean": [0.5, 0.5]}}, ["handler.preprocess.mean", "3 numbers"]),
    ({"preprocess": {"std": [1, 0, 1]}}, ["handler.preprocess.std", "> 0"]),
    ({"classifier": {"top_k": 0}}, ["handler.classifier.top_k", "> 0", "0"]),
    ({"model": {"format": "eager"}}, ["handler.model.model_class", "required"]),
    ({"model": {"model_class": "Net"}}, ["handler.model.model_class", "file.py:ClassName"]),
    ({"inputs": {"max_bytes": -1}}, ["handler.inputs.max_bytes", "> 0"]),
    ({"preprocess": "fast"}, ["handler.preprocess", "mapping", "'fast'"]),
])
def test_bad_config_names_key_and_value(section, fragments):
    with pytest.raises(ConfigError) as info:
        ImageClassifierConfig.from_mapping(section)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_handler_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="handler: expected a mapping"):
        load_handler_config({"handler": [1, 2]})


def test_overrides_set_nested_keys_with_yaml_values():
    section = {"preprocess": {"backend": "cpu"}}
    out = apply_overrides(section, ["preprocess.resize_size=320", "classifier.top_k=3", "preprocess.jpeg_draft=false"])
    assert out == {"preprocess": {"backend": "cpu", "resize_size": 320, "jpeg_draft": False}, "classifier": {"top_k": 3}}
    assert section == {"preprocess": {"backend": "cpu"}}  # input untouched
    cfg = ImageClassifierConfig.from_mapping(out)
    assert cfg.preprocess.jpeg_draft is False and cfg.classifier.top_k == 3


@pytest.mark.parametrize("item,fragment", [
    ("classifier.top_k", "expected key=value"),
    ("=3", "expected key=value"),
    ("preprocess.backend.x=1", "is a value, not a section"),
])
def test_bad_overrides(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides({"preprocess": {"backend": "cpu"}}, [item])


def test_to_dict_round_trips():
    cfg = ImageClassifierConfig.from_mapping({"classifier": {"top_k": 2}})
    assert ImageClassifierConfig.from_mapping(cfg.to_dict()) == cfg


def test_the_shared_section_knows_no_task_and_each_task_adds_its_own():
    with pytest.raises(ConfigError, match=r"handler: unknown key 'detector'"):
        HandlerConfig.from_mapping({"detector": {"score_threshold": 0.5}})
    shared = {f for f in HandlerConfig.__dataclass_fields__}
    for task in TASK_HANDLERS:
        cls = task_handler(task)
        assert cls.task == task and issubclass(cls.config_class, HandlerConfig)
        own = set(cls.config_class.__dataclass_fields__) - shared
        # at least one section of its own (detector); a task built on another keeps that one's section
        # beside its own (the cascade: detector + cascade)
        assert own, (task, own)


def test_task_defaults_yield_to_a_users_center_crop():
    from handlers.config import with_task_defaults

    seg = HandlerConfig.from_mapping(with_task_defaults({"preprocess": {"crop_size": 480, "resize_size": 480}},
                                                        task_handler("semantic-segmentation").task_defaults))
    assert seg.preprocess.input_hw == (480, 480) and seg.preprocess.geometry == "letterbox"
    det = HandlerConfig.from_mapping(with_task_defaults({"preprocess": {"geometry": "center_crop"}}, task_handler("object-detection").task_defaults))
    assert det.preprocess.input_hw == (224, 224)
    plain = HandlerConfig.from_mapping(with_task_defaults({}, task_handler("object-detection").task_defaults))
    assert plain.preprocess.input_hw == (640, 640) and plain.preprocess.std == (1.0, 1.0, 1.0)
