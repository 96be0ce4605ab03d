"""Progress a person can read: a bar on a terminal, plain periodic lines otherwise, a final summary,
and the --max-error-rate guard.

    progress = Progress(total=job.rows, already=rows_done_before_resume, max_error_rate=0.1)
    progress(rows, errors)      # what engines call after every batch (increments)
    progress.close()
    print(summary_text(total, progress))

On a terminal (stderr is a TTY) one line is redrawn at most 10 times a second:

    [##########..........]  5120/10240  50%  312.4 rows/s  ETA 0:00:16  errors 3

otherwise one plain line every `interval` seconds (default 10) and at the end, for logs:

    tsgpu batch: 5120/10240 rows (50%), 312.4 rows/s, ETA 16s, 3 errors

`--max-error-rate F` (a fraction, 0.05 = 5%): once at least `min_rows` rows (50, or the whole job
if smaller) have been answered in this run, a share of error rows above F raises ErrorRateExceeded
from the progress call; the engine stops its workers and the job ends without `_SUCCESS`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from .job import JobError, JobSummary

MIN_ROWS_FOR_RATE = 50


class ErrorRateExceeded(JobError):
    """More error rows than --max-error-rate allows; the message gives the counts and the limit."""


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts rows and errors from engine callbacks (thread-safe) and shows them."""

    def __init__(self, total: int, already: int = 0, max_error_rate: float | None = None,
                 stream: TextIO | None = None, tty: bool | None = None, interval: float = 10.0,
                 min_rows: int = MIN_ROWS_FOR_RATE, label: str = "tsgpu batch") -> None:
        self.total = total
        self.already = already  # rows in shards done before this run (--resume)
        self.rows = 0  # rows answered in this run
        self.errors = 0
        self.max_error_rate = max_error_rate
        self.min_rows = max(1, min(min_rows, total - already)) if total > already else 1
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.label = label
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._closed = False

    # -- what engines call -------------------------------------------------------------------------

    def __call__(self, rows: int, errors: int) -> None:
        with self._lock:
            self.rows += rows
            self.errors += errors
            now = time.monotonic()
            if now - self._last_draw >= (0.1 if self.tty else self.interval):
                self._last_draw = now
                self._draw(now)
            self._check_rate()

    def _check_rate(self) -> None:
        limit = self.max_error_rate
        if limit is None or self.rows < self.min_rows:
            return
        rate = self.errors / self.rows
        if rate > limit:
            raise ErrorRateExceeded(
                f"--max-error-rate {limit:g} exceeded: {self.errors} of {self.rows} rows "
                f"({rate:.1%}) were errors; stopped. Look at the error_type/error_message columns of the parts "
                f"written so far, fix the inputs or the archive, then rerun with --resume (or raise --max-error-rate)")

    # -- display -----------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        elapsed = self.elapsed
        return self.rows / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        left = self.total - self.already - self.rows
        return left / rate if rate > 0 else None

    def line(self) -> str:
        done = self.already + self.rows
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = self.eta()
        eta_text = _clock(eta) if eta is not None else "?"
        if self.tty:
            width = 20
            filled = int(width * done / self.total) if self.total else width
            bar = "#" * filled + "." * (width - filled)
            return (f"[{bar}] {done:>{len(str(self.total))}}/{self.total} {pct:3.0f}%  {self.rate():.1f} rows/s  "
                    f"ETA {eta_text}  errors {self.errors}")
        return (f"{self.label}: {done}/{self.total} rows ({pct:.0f}%), {self.rate():.1f} rows/s, "
                f"ETA {eta_text}, {self.errors} errors")

    def _draw(self, now: float) -> None:
        if self._closed:
            return
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the last state (and end the terminal line)."""
        with self._lock:
            if self._closed:
                return
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
            self._closed = True


def summary_text(total: JobSummary, progress: Progress, output: str) -> str:
    """The final summary: rows, errors by type, throughput, wall time, where the output is."""
    ok = total.rows - total.error_rows
    lines = [f"{progress.label}: {total.rows} rows in {output} ({ok} ok, {total.error_rows} errors)"]
    for kind, n in sorted(total.errors.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {n:>8}  {kind}")
    wall = progress.elapsed
    resumed = f"; {progress.already} rows from shards already done (--resume)" if progress.already else ""
    lines.append(f"  {progress.rows} rows this run in {_clock(wall)} ({progress.rows / wall if wall > 0 else 0:.1f} "
                 f"rows/s){resumed}")
    return "\n".join(lines)
