"""Offline batch inference with the same archive: `tsgpu batch ARCHIVE.mar --input IN --output OUT/`.

The room of the offline runner (docs/batch.md). It runs an archive's own handler in-process, as a
TorchServe worker runs it, over a list of inputs, and writes Parquet parts that hold, for every
input, the status and the exact body the server would have answered:

    inputs.py    IN (directory, list file, CSV/JSONL/Parquet) -> InputRefs in a fixed order + fingerprint
    job.py       JobSpec / Shard / plan_job; the output directory's manifest and _SUCCESS
    worker.py    ArchiveWorker: the .mar unpacked and loaded through TorchServe's model loader
    shards.py    one shard -> one part file (temporary name + rename, footer metadata), shard_done
    output.py    the Parquet schema: common columns + typed columns per task
    progress.py  a bar on a terminal, plain lines otherwise, the final summary
    engines/     local (a process pool) and ray (a Ray cluster)
    annotate.py  --annotate DIR / `tsgpu annotate`: boxes and masks drawn on the input images
    cli.py       `tsgpu batch` and `tsgpu annotate` argument parsing

Nothing here is imported by `handlers`; nothing is imported at package import.
"""
