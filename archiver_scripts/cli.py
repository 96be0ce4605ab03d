"""The `tsgpu` command.

    tsgpu compile --model torchvision:resnet50 --output DIR [...]    compile + validate an artifact
    tsgpu archive --name NAME --model FILE --export-path DIR [...]   build a .mar
    tsgpu serve [--model-store DIR] [--ts-config config.properties] run stock torchserve
    tsgpu demo                                                       the end-to-end demo
    tsgpu kserve --model-store DIR --output DIR                      KServe storage layout + InferenceService
    tsgpu autoscale --policy POLICY.yaml [--management URL] [...]  priority autoscaler beside torchserve
    tsgpu profile ARCHIVE.mar --images DIR [--batch-sizes 1,4,8]     per-stage time, bottleneck, recommendations
    tsgpu batch ARCHIVE.mar --input IN --output OUT/ [...]           offline batch inference into Parquet
    tsgpu annotate ARCHIVE.mar IMAGE... [--out DIR]                  draw boxes/masks on a few images
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from handlers.errors import ConfigError
from handlers.tasks import TASK_HANDLERS

EXIT_USAGE = 2


def _archive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="package a model with our handler into NAME.mar",
                       description="Build a self-contained TorchServe archive (model, handler code, model-config.yaml).")
    p.add_argument("--name", required=True, help="model name (archive is NAME.mar)")
    p.add_argument("--task", default="image-classification", choices=list(TASK_HANDLERS),
                   help="task handler: %(choices)s (default: %(default)s)")
    p.add_argument("--model", required=True, action="append",
                   help="artifact: .pt2 (torch.export / AOTInductor / TensorRT), .pt (TorchScript) or a state dict; "
                        "repeat for artifacts from `tsgpu compile` for several devices (the worker picks one)")
    p.add_argument("--model-class", help="model.py:ClassName, for a state dict (eager mode)")
    p.add_argument("--second-model", help="--task cascade: the second model's artifact, run on each kept box's crop")
    p.add_argument("--second-task", choices=["image-embedding", "image-classification"],
                   help="--task cascade: what the second model does (default: image-embedding; docs/tasks/cascade.md)")
    p.add_argument("--labels", help="index_to_name.json: {\"0\": \"name\", ...}")
    p.add_argument("--media", default="image", choices=["image", "video"],
                   help="what a request carries: image, or video (a clip; TorchServe batchSize 1, frames batched "
                        "by handler.video.frame_batch; docs/video.md) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="TorchServe batchSize (default 8; video archives: 1)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms (default 10)")
    p.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    p.add_argument("--response-timeout", type=int, default=120, help="seconds (default 120)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="handler setting, e.g. classifier.top_k=3 (repeatable)")
    p.add_argument("--handler-class", help="module:Class, your VisionHandler subclass (ship its module with --extra-files)")
    p.add_argument("--extra-files", action="append", default=[], metavar="PATH", help="extra file or directory to include (repeatable)")
    p.add_argument("--export-path", required=True, help="directory to write NAME.mar into (e.g. model_store)")
    p.add_argument("--force", action="store_true", help="overwrite an existing archive")


def _compile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="surgery + compile (TensorRT / AOTInductor / export / eager) with a cache",
                       description="Compile a model into a validated artifact plus a metadata JSON beside it.")
    p.add_argument("--model", required=True, help="torchvision:NAME or file.py:factory (a class or function returning the model)")
    p.add_argument("--weights", help="state dict to load (torch.load with weights_only=True); default: the model's own init")
    p.add_argument("--num-classes", type=int, help="torchvision models: number of classes")
    p.add_argument("--backend", default="auto", help="auto | tensorrt | aoti | export | eager (default auto)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (default fp32)")
    p.add_argument("--batch", default="1,8,32", help="MIN,OPT,MAX batch sizes the artifact accepts (default 1,8,32)")
    p.add_argument("--input-size", default="224", metavar="SIZE|H,W",
                   help="model input: one side for a square (224) or HEIGHT,WIDTH (480,640) (default 224)")
    p.add_argument("--channels-last", action="store_true", help="compile for channels-last inputs")
    p.add_argument("--cpu-target", default="native", choices=["native", "x86-64-v3"],
                   help="aoti on CPU: native = this host's instructions (fastest; the package loads only on "
                        "CPUs with the same extensions), x86-64-v3 = any AVX2/FMA CPU (Linux x86-64)")
    p.add_argument("--hardware-compatible", action="store_true", help="TensorRT: engine that loads on any Ampere+ GPU")
    p.add_argument("--no-surgery", action="store_true", help="skip the surgery passes")
    p.add_argument("--tolerance", type=float, help="max abs diff vs eager allowed (default: by precision)")
    p.add_argument("--cache-dir", type=Path, help="artifact cache (default $TSGPU_CACHE_DIR or ~/.cache/tsgpu/artifacts)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--name", default="", help="artifact file stem (default: from --model)")
    p.add_argument("--output", required=True, type=Path, help="directory for the artifact and its .json")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run stock torchserve on a model store (foreground; Ctrl-C stops it)")
    p.add_argument("--model-store", default="model_store")
    p.add_argument("--ts-config", default="config.properties", metavar="FILE",
                   help="TorchServe's config.properties (torchserve's own --ts-config; default: config.properties)")
    # `--config` means KEY=VALUE settings for `tsgpu archive`; here it was the config file. Still accepted
    # (with a note on stderr) so that existing scripts keep working.
    p.add_argument("--config", dest="deprecated_config", default=None, metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--models", default="all", help="models to load (default: all)")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a toy classifier, archive it, serve it, query it")
    p.add_argument("--model-store", default="model_store")


def _autoscale_parser(sub: argparse._SubParsersAction) -> None:
    from autoscaler.main import add_arguments

    add_arguments(sub.add_parser("autoscale", help="scale each model's workers by priority (runs beside torchserve)",
                                 description="Priority autoscaler for a stock TorchServe (docs/autoscaling.md)."))


def _run_compile(args: argparse.Namespace) -> int:
    from .compile import CompileOptions, compile_model, parse_batch, parse_input_size

    opts = CompileOptions(
        model=args.model, output=args.output, name=args.name, weights=args.weights, num_classes=args.num_classes,
        backend=args.backend, device=args.device, precision=args.precision, batch=parse_batch(args.batch),
        input_size=parse_input_size(args.input_size), channels_last=args.channels_last,
        hardware_compatible=args.hardware_compatible,
        cpu_target=args.cpu_target,
        surgery=not args.no_surgery, cache_dir=args.cache_dir, use_cache=not args.no_cache, tolerance=args.tolerance,
    )
    result = compile_model(opts)
    for reason in result.fallbacks:
        print(f"note: fell back past {reason}")
    return 0


def _run_archive(args: argparse.Namespace) -> int:
    from .archive import build_archive

    build_archive(
        name=args.name, model=args.model, export_path=args.export_path, task=args.task,
        model_class=args.model_class, labels=args.labels, batch_size=args.batch_size,
        max_batch_delay=args.max_batch_delay, workers=args.workers, config=args.config,
        handler_class=args.handler_class, extra_files=args.extra_files,
        response_timeout=args.response_timeout, force=args.force, media=args.media,
        second_model=args.second_model, second_task=args.second_task,
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .java import find_java
    from .server import torchserve_executable

    ts_config = args.ts_config
    if args.deprecated_config is not None:
        print("tsgpu serve: --config is deprecated, use --ts-config (the TorchServe config.properties file)",
              file=sys.stderr)
        ts_config = args.deprecated_config
    java = find_java()
    print(f"tsgpu serve: Java {java.version} from {java.source} ({java.java_home})", flush=True)
    cmd = [torchserve_executable(), "--start", "--foreground", "--ncs", "--ts-config", ts_config,
           "--model-store", args.model_store, "--models", args.models]
    os.execvpe(cmd[0], cmd, java.env())
    return 0  # not reached


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.model_store))


def _kserve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kserve", help="write the storage layout KServe's TorchServe runtime reads, plus an InferenceService",
                       description="config/config.properties + model-store/*.mar + inferenceservice.yaml (docs/deploy.md).")
    p.add_argument("--model-store", required=True, help="directory with the .mar files")
    p.add_argument("--output", required=True, help="directory to write (upload it; storageUri points at it)")
    p.add_argument("--name", help="InferenceService name (default: the first model's)")
    p.add_argument("--protocol", default="v1", choices=["v1", "v2"], help="KServe protocol / TorchServe envelope")
    p.add_argument("--storage-uri", help="storageUri for the YAML (default: a placeholder to edit)")
    p.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu per pod (0 for CPU; default 1)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --output")


def _run_kserve(args: argparse.Namespace) -> int:
    from .kserve import KServeError, write_layout

    try:
        path = write_layout(args.model_store, args.output, name=args.name, protocol=args.protocol,
                            storage_uri=args.storage_uri, gpus=args.gpus, force=args.force)
    except KServeError as exc:
        print(f"tsgpu kserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.output}/config/config.properties, {args.output}/model-store/, {path}")
    return 0


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="load an archive in-process, time each stage, name the bottleneck",
                       description="Run a directory of images through an archive's handler as a worker would "
                                   "(no server) and recommend batchSize, micro_batch, decode_processes, workers and "
                                   "preprocess backend "
                                   "(docs/profiling.md).")
    p.add_argument("archive", help="the .mar to profile")
    p.add_argument("--images", required=True, help="directory of images to send (each file is one request)")
    p.add_argument("--batch-sizes", default="1,4,8", help="batch sizes to measure (default 1,4,8)")
    p.add_argument("--micro-batch", default="0,auto",
                   help="handler.pipeline.micro_batch values to measure at the best batch size; auto = half "
                        "of it (default 0,auto; the first value is used for the batch-size sweep)")
    p.add_argument("--decode-processes", default="0,auto",
                   help="handler.pipeline.decode_processes values to measure; auto = half the worker's CPUs, "
                        "at least 1 (default 0,auto)")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per run (default 2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run_profile(args: argparse.Namespace) -> int:
    from .profile import HandlerFailed, ProfileError, run_cli

    try:
        return run_cli(args.archive, args.images, args.batch_sizes, args.micro_batch, args.seconds, args.json,
                       args.decode_processes)
    except ProfileError as exc:
        print(f"tsgpu profile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HandlerFailed as exc:
        print(f"tsgpu profile: error: {exc}", file=sys.stderr)
        return 1


def _run_autoscale(args: argparse.Namespace) -> int:
    from autoscaler.main import run

    return run(args)


def _batch_parser(sub: argparse._SubParsersAction) -> None:
    from offline.cli import add_batch_parser

    add_batch_parser(sub)


def _run_batch(args: argparse.Namespace) -> int:
    from offline.cli import run_batch

    return run_batch(args)


def _annotate_parser(sub: argparse._SubParsersAction) -> None:
    from offline.cli import add_annotate_parser

    add_annotate_parser(sub)


def _run_annotate(args: argparse.Namespace) -> int:
    from offline.cli import run_annotate

    return run_annotate(args)


class Command(NamedTuple):
    """One `tsgpu` command: its name, the function adding its parser, and the one running it."""

    name: str
    add_parser: Callable[[argparse._SubParsersAction], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("compile", _compile_parser, _run_compile),
    Command("archive", _archive_parser, _run_archive),
    Command("serve", _serve_parser, _run_serve),
    Command("demo", _demo_parser, _run_demo),
    Command("autoscale", _autoscale_parser, _run_autoscale),
    Command("kserve", _kserve_parser, _run_kserve),
    Command("profile", _profile_parser, _run_profile),
    Command("batch", _batch_parser, _run_batch),
    Command("annotate", _annotate_parser, _run_annotate),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsgpu",
        description="TorchServe GPU handlers: " + ", ".join(c.name for c in COMMANDS)
                    + ". Run `tsgpu COMMAND --help` for one command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .archive import ArchiveError
    from .compile import CompileError
    from .java import JavaNotFound

    run = {c.name: c.run for c in COMMANDS}[args.command]
    try:
        return run(args)
    except (ArchiveError, ConfigError) as exc:
        print(f"tsgpu {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CompileError, JavaNotFound) as exc:
        print(f"tsgpu {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
