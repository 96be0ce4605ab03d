"""A batch job: what it runs (archive, config), over what (inputs in a fixed order, cut into fixed
shards), and where its output lives (`OUT/part-NNNNN.parquet`, `OUT/_manifest.json`, `OUT/_SUCCESS`).

    job, shards = plan_job("model.mar", "images/", "out/", batch_size=8)
    prepare_output(job, shards, resume=False, overwrite=False)   # refuses a foreign/half output
    summary = offline.engines.local.run(job, shards, workers=2, progress=...)
    finish(job, shards, [summary])                               # manifest with counts, then _SUCCESS

The job's identity is (archive sha256, --config overrides, input fingerprint, shard size): the
manifest written at the start records it, `--resume` refuses an output whose identity differs
(naming what differs), and every part's footer repeats it, so a part is trusted only when it was
written by this very job (offline/shards.py `shard_done`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Version of the output layout (manifest + part footers).
FORMAT = "tsgpu-batch/1"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
PART_PATTERN = "part-{:05d}.parquet"
#: The most rows per shard (and so per part file) the default shard size gives (`default_shard_size`).
DEFAULT_SHARD_SIZE = 1024
#: Shards per worker the default shard size aims at: a worker that finishes early takes another
#: shard, so a job under 1024 inputs still runs on every worker and the last shards balance out.
SHARDS_PER_WORKER = 4


class JobError(ValueError):
    """A job that cannot start or continue as asked; the message names the file/option and the fix."""


@dataclass(frozen=True)
class InputRef:
    """One input row, in deterministic order."""

    uri: str  # file path, URL, or "<file>#<line>" for a JSONL/CSV/Parquet row
    kind: str  # "file" | "url" | "json"
    value: str | None = None  # the URL or the JSON text; None for files (bytes read at run time)


@dataclass(frozen=True)
class JobSpec:
    """Everything a shard needs; picklable (sent to worker processes and Ray actors)."""

    archive: str  # path to the .mar
    archive_sha256: str
    config: dict[str, str]  # --config k=v overrides (same keys as tsgpu archive), applied over the archive's
    input_fingerprint: str
    output: str  # OUT/ directory
    batch_size: int
    shard_size: int
    device: str = "cpu"  # "cpu" or "cuda" (gpu id chosen by the engine)
    input: str = ""  # what --input named (for the manifest and messages)
    rows: int = 0  # inputs in the job (after --limit)
    max_request_size: int = 6_553_500  # the server's max_request_size: larger inputs get the frontend's 413
    workers: int = 1  # worker processes on one host: threads per worker are sized like the server's

    def identity(self) -> dict[str, Any]:
        """What must match for an existing output (or part) to belong to this job."""
        return {"archive_sha256": self.archive_sha256, "config": dict(sorted(self.config.items())),
                "input_fingerprint": self.input_fingerprint, "shard_size": self.shard_size}

    def part_path(self, index: int) -> Path:
        return Path(self.output) / PART_PATTERN.format(index)


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the job's inputs; shard `index` always holds the same inputs for one job."""

    index: int
    inputs: tuple[InputRef, ...]


@dataclass
class JobSummary:
    """Counts over some shards (an engine's run, or the whole job once merged)."""

    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error_type -> rows
    shards_written: int = 0
    shards_skipped: int = 0  # already done (--resume)
    seconds: float = 0.0
    stopped: str | None = None  # why the job stopped early (--max-error-rate), else None

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    def add(self, rows: int, errors: dict[str, int]) -> None:
        self.rows += rows
        for kind, n in errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n

    @staticmethod
    def from_outcomes(outcomes: Iterable[Any], seconds: float, skipped: int = 0,
                      stopped: str | None = None) -> JobSummary:
        """An engine's summary from its `offline.shards.ShardOutcome`s (both engines build it so)."""
        summary = JobSummary(seconds=seconds, shards_skipped=skipped, stopped=stopped)
        for outcome in outcomes:
            summary.add(outcome.rows, outcome.errors)
            summary.shards_written += 1
        return summary

    @staticmethod
    def merge(summaries: Iterable[JobSummary]) -> JobSummary:
        total = JobSummary()
        for s in summaries:
            total.add(s.rows, s.errors)
            total.shards_written += s.shards_written
            total.shards_skipped += s.shards_skipped
            total.seconds = max(total.seconds, s.seconds)
            total.stopped = total.stopped or s.stopped
        return total


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_config(items: Iterable[str]) -> dict[str, str]:
    """`--config k=v` strings -> {k: v} (the last of a repeated key wins); values stay text, parsed
    as YAML by the worker exactly as `tsgpu archive --config` parses them."""
    config: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JobError(f"--config {item!r}: expected key=value, e.g. classifier.top_k=3")
        config[key.strip()] = value
    return config


def plan_job(
    archive: str | Path,
    input: str | Path | Sequence[InputRef],
    output: str | Path,
    *,
    column: str | None = None,
    batch_size: int = 8,
    shard_size: int | None = None,
    config: Iterable[str] | dict[str, str] = (),
    limit: int | None = None,
    device: str = "cpu",
    workers: int = 1,
    max_request_size: int = 6_553_500,
    resume: bool = False,
) -> tuple[JobSpec, list[Shard]]:
    """Read the inputs in their fixed order, fingerprint them, hash the archive, cut the shards.

    `input` is what --input names (offline/inputs.py), or the InputRefs themselves, in order
    (`InputRef(str(Path(p).resolve()), "file")` for a file). `shard_size` None: the shard size
    recorded in OUT/_manifest.json when `resume` and there is one (so a resumed job keeps its
    shards whatever --workers says now), else `default_shard_size(...)`."""
    from .inputs import fingerprint, read_inputs

    archive_path = Path(archive)
    if not archive_path.is_file():
        raise JobError(f"{archive}: no such archive (build one with `tsgpu archive`)")
    for flag, value in (("--batch-size", batch_size), ("--shard-size", shard_size), ("--workers", workers)):
        if value is not None and value < 1:
            raise JobError(f"{flag} {value}: must be at least 1")
    if limit is not None and limit < 0:
        raise JobError(f"--limit {limit}: must be 0 or more")
    if isinstance(input, (str, Path)):
        refs = read_inputs(input, column=column)
        source = str(input)
    else:
        refs, source = list(input), "(a list of inputs)"
    if limit is not None:
        refs = refs[:limit]
    overrides = dict(config) if isinstance(config, dict) else parse_config(config)
    if shard_size is None:
        shard_size = (recorded_shard_size(output) if resume else None) or default_shard_size(
            len(refs), workers, batch_size)
    job = JobSpec(
        archive=str(archive_path.resolve()), archive_sha256=file_sha256(archive_path), config=overrides,
        input_fingerprint=fingerprint(refs), output=str(Path(output)), batch_size=batch_size,
        shard_size=shard_size, device=device, input=source, rows=len(refs),
        max_request_size=max_request_size, workers=workers,
    )
    shards = [Shard(i, tuple(refs[start:start + shard_size]))
              for i, start in enumerate(range(0, len(refs), shard_size))]
    return job, shards


def default_shard_size(rows: int, workers: int, batch_size: int) -> int:
    """The shard size when --shard-size is not given. One worker: DEFAULT_SHARD_SIZE (nothing to
    balance). More: about SHARDS_PER_WORKER shards per worker (so every worker gets work and the
    tail balances), a whole number of batches (no short batch inside a shard), at least one batch
    and at most DEFAULT_SHARD_SIZE rows (rounded down to whole batches). A function of the job
    alone, recorded in the manifest, which --resume reads (so another --workers keeps the shards)."""
    if workers <= 1:
        return DEFAULT_SHARD_SIZE
    per_shard = -(-max(rows, 1) // (max(workers, 1) * SHARDS_PER_WORKER))
    size = -(-per_shard // batch_size) * batch_size
    cap = max(batch_size, DEFAULT_SHARD_SIZE // batch_size * batch_size)
    return max(batch_size, min(size, cap))


def recorded_shard_size(output: str | Path) -> int | None:
    """The shard size in OUT/_manifest.json, or None when there is no readable one."""
    try:
        manifest = json.loads((Path(output) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    size = (manifest.get("job") or {}).get("shard_size") if isinstance(manifest, dict) else None
    return size if isinstance(size, int) and size >= 1 else None


# -- the output directory ----------------------------------------------------------------------


def _ours(path: Path) -> bool:
    """Files this runner writes into OUT/ (and so may delete with --overwrite)."""
    name = path.name
    return (name in (MANIFEST, SUCCESS) or (name.startswith("part-") and name.endswith(".parquet"))
            or name.startswith(".part-") or name.startswith(f".{MANIFEST}"))


def prepare_output(job: JobSpec, shards: Sequence[Shard], resume: bool = False, overwrite: bool = False) -> None:
    """Make OUT/ ready for this job and record the job in `_manifest.json` (state "running").

    An existing output needs --resume (same job: kept, done shards skipped) or --overwrite (our
    files removed); neither is an error, and so is --resume over another job's output."""
    if resume and overwrite:
        raise JobError("--resume and --overwrite contradict each other: pick one")
    out = Path(job.output)
    if out.exists() and not out.is_dir():
        raise JobError(f"--output {out}: exists and is not a directory")
    existing = sorted(p for p in out.iterdir() if _ours(p)) if out.is_dir() else []
    if existing and overwrite:
        for path in existing:
            path.unlink()
    elif existing and resume:
        check_resumable(job, out)
        with contextlib.suppress(FileNotFoundError):
            (out / SUCCESS).unlink()
    elif existing:
        raise JobError(f"--output {out} already holds a batch output ({len(existing)} files, e.g. {existing[0].name}): "
                       f"pass --resume to continue it or --overwrite to replace it")
    elif resume and not existing:
        pass  # nothing to resume: a fresh start is what --resume means then
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(job, shards, state="running")


def check_resumable(job: JobSpec, out: Path) -> None:
    """Refuse --resume over an output written by another job, naming each difference."""
    manifest_file = out / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise JobError(f"--resume: {manifest_file} is missing, so nothing says which job wrote {out}: "
                       f"use --overwrite to start over") from None
    except (OSError, ValueError) as exc:
        raise JobError(f"--resume: {manifest_file} is unreadable ({exc}): use --overwrite to start over") from None
    theirs = manifest.get("job") or {}
    ours = job.identity()
    names = {"archive_sha256": "the archive", "config": "--config", "input_fingerprint": "the inputs",
             "shard_size": "--shard-size"}
    diffs = [f"{names[key]} changed ({key}: {_short(theirs.get(key))} -> {_short(ours[key])})"
             for key in ours if theirs.get(key) != ours[key]]
    if diffs:
        raise JobError(f"--resume refused: {out} was written by another job: " + "; ".join(diffs)
                       + ". Use --overwrite to start over, or rerun with the original archive/config/inputs")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def write_manifest(job: JobSpec, shards: Sequence[Shard], state: str, summary: JobSummary | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write `_manifest.json` atomically (temporary name + rename)."""
    out = Path(job.output)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "state": state,
        "job": job.identity(),
        "archive": job.archive,
        "input": job.input,
        "inputs": job.rows,
        "batch_size": job.batch_size,
        "device": job.device,
        "shards": [{"index": s.index, "part": PART_PATTERN.format(s.index), "rows": len(s.inputs),
                    "first": s.inputs[0].uri if s.inputs else None} for s in shards],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if summary is not None:
        manifest["counts"] = {"rows": summary.rows, "ok": summary.rows - summary.error_rows,
                              "errors": summary.error_rows, "errors_by_type": dict(sorted(summary.errors.items()))}
    if extra:
        manifest.update(extra)
    target = out / MANIFEST
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, target)
    return target


def finish(job: JobSpec, shards: Sequence[Shard], summaries: Iterable[JobSummary] = ()) -> JobSummary:
    """Check every shard's part, write the final manifest with counts read from the parts, then
    `_SUCCESS`. Counts come from the parts (not the engines' summaries) so that shards skipped by
    --resume are counted too. Raises JobError naming the missing shards."""
    from .shards import read_part_counts, shard_done

    missing = [s.index for s in shards if not shard_done(job, s)]
    if missing:
        raise JobError(f"{len(missing)} shard(s) have no valid part in {job.output} (e.g. "
                       f"{PART_PATTERN.format(missing[0])}): rerun with --resume")
    total = JobSummary()
    for s in shards:
        rows, errors = read_part_counts(job, s)
        total.add(rows, errors)
    merged = JobSummary.merge(summaries)
    total.shards_written, total.shards_skipped = merged.shards_written, merged.shards_skipped
    total.seconds, total.stopped = merged.seconds, merged.stopped
    write_manifest(job, shards, state="complete", summary=total)
    (Path(job.output) / SUCCESS).write_text("")
    return total


def error_counts(error_types: Iterable[str | None]) -> dict[str, int]:
    return dict(Counter(t for t in error_types if t))
