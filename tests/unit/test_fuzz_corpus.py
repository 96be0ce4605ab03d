"""Replay the fuzzer's corpus (fuzz/fuzz_decode.py --save-corpus): each input keeps its clean outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from handlers.errors import RequestError
from handlers.preprocess import PreprocessSpec
from handlers.preprocess.cpu import CpuPreprocessor

CORPUS = Path(__file__).resolve().parent.parent / "fuzz_corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())


@pytest.fixture(scope="module")
def cpu_backend():
    # the same limit the fuzzer ran with
    backend = CpuPreprocessor(PreprocessSpec(max_image_pixels=20_000_000), threads=1)
    yield backend
    backend.close()


def test_corpus_covers_every_outcome():
    outcomes = {v["cpu"] for v in INDEX.values()}
    assert {"ok", "400 invalid_input", "413 too_large", "415 unsupported_media_type"} <= outcomes


@pytest.mark.parametrize("name", sorted(INDEX))
def test_corpus_input_keeps_its_clean_outcome(cpu_backend, name):
    batch = cpu_backend.run([(CORPUS / name).read_bytes()])
    err = batch.errors[0]
    if err is None:
        outcome = "ok"
        assert torch.isfinite(batch.tensor).all()
    else:
        assert isinstance(err, RequestError) and err.message
        outcome = f"{err.code} {err.type}"
    assert outcome == INDEX[name]["cpu"]
