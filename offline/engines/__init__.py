"""Engines run a job's shards somewhere: `local` (a process pool on this machine) and `ray` (a Ray
cluster). Each exposes `run(job, shards, ...) -> JobSummary` over the same `offline.shards.run_shard`."""
