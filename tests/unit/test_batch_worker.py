"""ArchiveWorker: an archive's handler in this process, fed and read back as a TorchServe worker is.

(The proof that its answers are the server's, byte for byte, is tests/e2e/test_batch_sameness.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from archiver_scripts import samples
from offline.job import JobError, plan_job
from offline.worker import (
    ArchiveWorker,
    _Reader,
    encode_batch,
    error_fields,
    frontend_error_body,
    unpack_archive,
)
from tests import models

PHOTO = samples.encode(samples.photos()["chelsea"], "JPEG", quality=90)


@pytest.fixture(scope="module")
def tiny_mar(tmp_path_factory):
    build, store = tmp_path_factory.mktemp("worker-build"), tmp_path_factory.mktemp("worker-store")
    return models.build_tiny_archive("tiny", store, build, batch_size=4, config=["classifier.top_k=3"])


@pytest.fixture(autouse=True)
def archive_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSGPU_ARCHIVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _inputs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_photo.jpg").write_bytes(PHOTO)
    (tmp_path / "in" / "b_text.jpg").write_bytes(b"not an image")
    (tmp_path / "in" / "c_big.bin").write_bytes(b"\0" * 50_000)
    listing = tmp_path / "list.txt"
    listing.write_text("in/a_photo.jpg\nin/b_text.jpg\nin/c_big.bin\nin/missing.jpg\nhttp://127.0.0.1:9/x.jpg\n")
    return listing


def test_the_frontends_request_shape_decoded_by_torchserve():
    from ts.protocol.otf_message_handler import _retrieve_inference_msg

    wire = encode_batch([("id-1", [("Content-Type", "application/octet-stream")],
                          [("body", "application/octet-stream", b"\xff\xd8raw")]),
                         ("id-2", [], [("body", "application/json", b'{"url": "http://h/x.jpg"}')]),
                         ("id-3", [], [("body", "application/json", b'{"broken": ')])])
    batch = _retrieve_inference_msg(_Reader(wire))
    assert [r["requestId"] for r in batch] == [b"id-1", b"id-2", b"id-3"]
    assert batch[0]["parameters"] == [{"name": "body", "contentType": "application/octet-stream", "value": b"\xff\xd8raw"}]
    assert batch[1]["parameters"][0]["value"] == {"url": "http://h/x.jpg"}  # JSON arrives parsed, as in a worker
    assert batch[2]["parameters"][0]["value"] == b'{"broken": '  # ...and unparsable JSON as its bytes


def test_frontend_error_body_is_gsons_pretty_errorresponse():
    assert frontend_error_body(503, "Prediction failed") == (
        '{\n  "code": 503,\n  "type": "InternalServerException",\n  "message": "Prediction failed"\n}\n')
    assert '"a \\u003d \\u003cb\\u003e"' in frontend_error_body(500, "a = <b>")
    assert error_fields(503, frontend_error_body(503, "Prediction failed")) == ("InternalServerException",
                                                                                "Prediction failed")
    assert error_fields(413, "") == ("HTTP 413", None)


def test_rows_answered_as_the_server_would(tiny_mar, tmp_path):
    job, (shard,) = plan_job(tiny_mar, _inputs(tmp_path), tmp_path / "out", batch_size=4, max_request_size=40_000)
    with ArchiveWorker(job) as worker:
        assert worker.task_info().task == "image-classification"
        results = worker.run(shard.inputs)
    assert [r.uri for r in results] == [ref.uri for ref in shard.inputs]
    photo, text, big, missing, url = results
    assert photo.status == 200 and photo.error_type is None and photo.content_type == "application/json"
    assert len(json.loads(photo.response)["predictions"]) == 3  # the archive's top_k
    assert photo.response == json.dumps(json.loads(photo.response), separators=(",", ":"))  # the handler's bytes
    assert (text.status, text.error_type) == (415, "unsupported_media_type")
    assert json.loads(text.response)["code"] == 415
    # over max_request_size: the frontend's 413, the handler never sees it
    assert (big.status, big.response, big.error_type) == (413, "", "RequestTooLarge")
    assert (missing.status, missing.error_type) == (0, "InputReadError") and "missing.jpg" in missing.error_message
    assert (url.status, url.error_type) == (403, "forbidden") and "loopback" in url.error_message  # sent as {"url"}


def test_config_overrides_apply_over_the_archives(tiny_mar, tmp_path):
    listing = _inputs(tmp_path)
    job, (shard,) = plan_job(tiny_mar, listing, tmp_path / "out", config=["classifier.top_k=1"])
    with ArchiveWorker(job) as worker:
        (photo,) = worker.run(shard.inputs[:1])
    assert len(json.loads(photo.response)["predictions"]) == 1
    bad, _ = plan_job(tiny_mar, listing, tmp_path / "out2", config=["classifier.top_kk=1"])
    with pytest.raises(Exception, match="top_kk"):
        ArchiveWorker(bad)


def test_threads_sized_like_a_server_with_that_many_workers(tiny_mar, tmp_path, keep_torch_threads):
    from handlers.runtime import available_cpus

    job, _ = plan_job(tiny_mar, _inputs(tmp_path), tmp_path / "out", workers=2)
    with ArchiveWorker(job) as worker:
        assert worker.model_config["minWorkers"] == worker.model_config["maxWorkers"] == 2
        assert torch.get_num_threads() == max(1, available_cpus() // 2)
    with ArchiveWorker(job, threads=1):
        assert torch.get_num_threads() == 1


def test_a_failing_handler_answers_every_row_of_its_batch_like_the_frontend(tiny_mar, tmp_path, monkeypatch):
    job, (shard,) = plan_job(tiny_mar, _inputs(tmp_path), tmp_path / "out")
    with ArchiveWorker(job) as worker:
        def broken(*args, **kwargs):
            raise RuntimeError("model exploded")

        monkeypatch.setattr(worker.handler, "forward", broken)
        results = worker.run(shard.inputs[:2])
    assert [r.status for r in results] == [503, 503]
    assert results[0].response == frontend_error_body(503, "Prediction failed")


def test_unpack_is_cached_by_sha256_and_refuses_a_changed_archive(tiny_mar, tmp_path):
    job, _ = plan_job(tiny_mar, _inputs(tmp_path), tmp_path / "out")
    cache = tmp_path / "c"
    first = unpack_archive(job.archive, job.archive_sha256, cache)
    assert first == cache / job.archive_sha256 and (first / "MAR-INF" / "MANIFEST.json").is_file()
    assert unpack_archive(job.archive, job.archive_sha256, cache) == first
    with pytest.raises(JobError, match="changed since the job was planned"):
        unpack_archive(job.archive, "0" * 64, cache)
    assert [p.name for p in cache.iterdir()] == [job.archive_sha256]  # no staging leftovers


def test_a_streaming_handlers_chunks_are_joined_like_a_chunked_response(tiny_mar, tmp_path):
    """A handler that streams (TorchServe's intermediate responses, as video archives with
    `video.stream: true` do) is answered by the first chunk's status and content type and the
    chunks' bodies in order, then the final one."""
    from ts.handler_utils.utils import send_intermediate_predict_response

    job, (shard,) = plan_job(tiny_mar, _inputs(tmp_path), tmp_path / "out", batch_size=1)

    def streaming(data, context):
        context.set_response_content_type(0, "application/x-ndjson")
        context.set_response_status(207, "", 0)
        for line in ('{"frame":0}\n', '{"frame":1}\n'):
            send_intermediate_predict_response([line], context.request_ids, "Intermediate", 200, context)
        context.set_response_status(200, "", 0)  # too late: the status went out with the first chunk
        return ['{"summary":true}\n']

    with ArchiveWorker(job) as worker:
        worker.service._entry_point = streaming
        (result,) = worker.run(shard.inputs[:1])
    assert result.status == 207 and result.content_type == "application/x-ndjson"
    assert result.response == '{"frame":0}\n{"frame":1}\n{"summary":true}\n'
