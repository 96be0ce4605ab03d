"""The `tsgpu` command.

    tsgpu archive --name NAME --model FILE --export-path DIR [...]   build a .mar
    tsgpu serve [--model-store DIR] [--config config.properties]    run stock torchserve
    tsgpu demo                                                       the end-to-end demo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from handlers.errors import ConfigError

EXIT_USAGE = 2


def _archive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="package a model with our handler into NAME.mar",
                       description="Build a self-contained TorchServe archive (model, handler code, model-config.yaml).")
    p.add_argument("--name", required=True, help="model name (archive is NAME.mar)")
    p.add_argument("--task", default="image-classification", help="task handler (default: image-classification)")
    p.add_argument("--model", required=True, help="artifact: .pt2 (torch.export / AOTInductor), .pt (TorchScript) or a state dict")
    p.add_argument("--model-class", help="model.py:ClassName, for a state dict (eager mode)")
    p.add_argument("--labels", help="index_to_name.json: {\"0\": \"name\", ...}")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms (default 10)")
    p.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    p.add_argument("--response-timeout", type=int, default=120, help="seconds (default 120)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="handler setting, e.g. classifier.top_k=3 (repeatable)")
    p.add_argument("--handler-class", help="module:Class, your VisionHandler subclass (ship its module with --extra-files)")
    p.add_argument("--extra-files", action="append", default=[], metavar="PATH", help="extra file or directory to include (repeatable)")
    p.add_argument("--export-path", required=True, help="directory to write NAME.mar into (e.g. model_store)")
    p.add_argument("--force", action="store_true", help="overwrite an existing archive")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run stock torchserve on a model store (foreground; Ctrl-C stops it)")
    p.add_argument("--model-store", default="model_store")
    p.add_argument("--config", default="config.properties", help="TorchServe config.properties")
    p.add_argument("--models", default="all", help="models to load (default: all)")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a toy classifier, archive it, serve it, query it")
    p.add_argument("--model-store", default="model_store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsgpu", description="TorchServe GPU handlers: archive, serve, demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    _archive_parser(sub)
    _serve_parser(sub)
    _demo_parser(sub)
    # `compile` (Torch-TensorRT / AOTInductor / export with an engine cache) comes with the
    # compiled-backbones work; it will register itself here.
    return parser


def _run_archive(args: argparse.Namespace) -> int:
    from .archive import build_archive

    build_archive(
        name=args.name, model=args.model, export_path=args.export_path, task=args.task,
        model_class=args.model_class, labels=args.labels, batch_size=args.batch_size,
        max_batch_delay=args.max_batch_delay, workers=args.workers, config=args.config,
        handler_class=args.handler_class, extra_files=args.extra_files,
        response_timeout=args.response_timeout, force=args.force,
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .java import find_java
    from .server import torchserve_executable

    java = find_java()
    print(f"tsgpu serve: Java {java.version} from {java.source} ({java.java_home})", flush=True)
    cmd = [torchserve_executable(), "--start", "--foreground", "--ncs", "--ts-config", args.config,
           "--model-store", args.model_store, "--models", args.models]
    os.execvpe(cmd[0], cmd, java.env())
    return 0  # not reached


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.model_store))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .archive import ArchiveError
    from .java import JavaNotFound

    try:
        return {"archive": _run_archive, "serve": _run_serve, "demo": _run_demo}[args.command](args)
    except (ArchiveError, ConfigError) as exc:
        print(f"tsgpu {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JavaNotFound as exc:
        print(f"tsgpu {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
