"""`tsgpu autoscale`: the command line of the controller (argument parsing and process set-up)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_METRICS = "http://127.0.0.1:8082"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, type=Path, help="policy YAML (see docs/autoscaling.md)")
    p.add_argument("--management", default=DEFAULT_MANAGEMENT, help=f"TorchServe management URL (default {DEFAULT_MANAGEMENT})")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"TorchServe metrics URL (default {DEFAULT_METRICS})")
    p.add_argument("--key-file", type=Path,
                   help="TorchServe key_file.json (token authorization; default: ./key_file.json if present)")
    p.add_argument("--dry-run", action="store_true", help="print decisions, change nothing")
    p.add_argument("--check", action="store_true",
                   help="verify the set-up (addresses, key file, metrics_mode=prometheus, the policy's models "
                        "registered), print one line per check and exit: 0 when all pass, 1 otherwise")
    p.add_argument("--listen", default="127.0.0.1:9465", metavar="HOST:PORT",
                   help="serve the autoscaler's own Prometheus metrics here (default 127.0.0.1:9465; 'off' to disable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def key_file_of(args: argparse.Namespace) -> Path | None:
    """--key-file, else ./key_file.json when present (where torchserve writes it when started here)."""
    if args.key_file is None and Path("key_file.json").is_file():
        return Path("key_file.json")
    return args.key_file


def check(args: argparse.Namespace) -> int:
    """`--check`: every check of the set-up, one line each; 0 when all pass, 1 otherwise."""
    from .check import report, run_checks
    from .torchserve import KeyFile, ManagementClient

    management = ManagementClient(args.management, KeyFile(key_file_of(args)))
    return report(run_checks(args.policy, management, args.metrics))


def run(args: argparse.Namespace) -> int:
    """Validate the policy, then run the loop until SIGINT/SIGTERM. Raises PolicyError on a bad policy."""
    if args.check:
        return check(args)
    from .controller import Controller
    from .exporter import Registry, serve
    from .policy import PolicyError, load_policy
    from .torchserve import KeyFile, ManagementClient

    policy = load_policy(args.policy)
    logging.basicConfig(level=args.log_level, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    key_file = key_file_of(args)
    registry = Registry()
    server = None
    if args.listen != "off":
        host, _, port = args.listen.rpartition(":")
        if not port.isdigit():
            raise PolicyError(f"--listen {args.listen!r}: expected HOST:PORT (e.g. 127.0.0.1:9465) or 'off'")
        try:
            server = serve(registry, host or "127.0.0.1", int(port))
        except OSError as exc:
            raise PolicyError(
                f"--listen {args.listen}: cannot serve the controller's metrics there ({exc.strerror or exc}); "
                f"another tsgpu autoscale may be running: pass --listen HOST:PORT with a free port, or --listen off"
            ) from None
        logging.getLogger("tsgpu.autoscale").info("own metrics at http://%s:%s/metrics", host or "127.0.0.1", port)
    controller = Controller(policy, ManagementClient(args.management, KeyFile(key_file)), args.metrics,
                            dry_run=args.dry_run, registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        controller.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsgpu-autoscale", description="Priority autoscaler for a stock TorchServe.")
    add_arguments(parser)
    from .policy import PolicyError

    try:
        return run(parser.parse_args(argv))
    except PolicyError as exc:
        print(f"tsgpu autoscale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
