"""rome-chat: a chatbot whose facts you can correct.

``python app.py`` serves the web app; ``python app.py COMMAND`` runs the command line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from chat_app.settings import Settings
from editing.defaults import DEVICE_MAPS, PRECISIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rome-chat" if os.path.basename(sys.argv[0]) == "rome-chat" else "app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory or id (offline cache), or a .gguf file; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--db", help="ledger: a file path or SQLAlchemy URL (default: $DATABASE_URL, else data/<model>.ledger.db)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when present)")
    parser.add_argument("--device-map", choices=DEVICE_MAPS,
                        help="spread a model larger than one device over the GPUs (and CPU) with accelerate, instead of --device")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="user:password protecting the whole app (or set ROME_CHAT_AUTH; ROME_CHAT_AUTH_FILE for a file of lines)")
    parser.add_argument("--read-only", action="store_true", help="visitors chat and view history; edits are refused")
    parser.add_argument("--skip-edit", type=int, action="append", default=[], metavar="ID",
                        help="start without this applied edit (damaged factors): it is marked failed, with an event")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    from chat_app.cli import add_commands

    add_commands(sub)
    trace = sub.add_parser("trace", help="causal trace of a fact, saved as a PNG")
    trace.add_argument("--prompt", required=True)
    trace.add_argument("--subject", required=True)
    trace.add_argument("--out", default="trace.png")
    trace.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="matrix products in bfloat16 (faster where the CPU has it) or float32 (exact)")  # fmt: skip
    sub.add_parser("evaluate", help="CounterFact / zsRE evaluation (see: app.py evaluate --help)", add_help=False)
    return parser.parse_known_args(argv)[0] if (argv or sys.argv[1:])[:1] == ["evaluate"] else parser.parse_args(argv)


def read_auth(flag: str | None) -> list[tuple[str, str]] | None:
    """Credentials from the flag, ``ROME_CHAT_AUTH`` or the file named by ``ROME_CHAT_AUTH_FILE`` (user:password lines)."""
    lines: list[str] = []
    if flag or os.environ.get("ROME_CHAT_AUTH"):
        lines = [flag or os.environ["ROME_CHAT_AUTH"]]
    elif os.environ.get("ROME_CHAT_AUTH_FILE"):
        with open(os.environ["ROME_CHAT_AUTH_FILE"], encoding="utf-8") as fh:
            lines = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    if not lines:
        return None
    pairs = [tuple(line.split(":", 1)) for line in lines]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise SystemExit("error: --auth must look like user:password")
    return [(u, p) for u, p in pairs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if args.device and args.device_map:
        raise SystemExit("error: give either --device or --device-map, not both")
    settings = Settings(model=args.model, db=args.db, device=args.device, device_map=args.device_map,
                        read_only=args.read_only, skip_edits=tuple(args.skip_edit))
    if args.command == "evaluate":
        from editing.evaluation.cli import main as evaluate_main

        rest = (argv if argv is not None else sys.argv[1:])
        rest = rest[rest.index("evaluate") + 1 :]
        rest += ["--model", args.model] if args.model else []
        return evaluate_main(rest + (["--device-map", args.device_map] if args.device_map else []))
    if args.command == "trace":
        from chat_app.tracing_cli import trace_to_png

        return trace_to_png(settings, args.prompt, args.subject, args.out, args.precision)
    if args.command:
        from chat_app.cli import main as cli_main

        return cli_main(args, settings)
    from chat_app.runtime import build_service, closing_on_stop
    from chat_app.ui import launch
    from db import LedgerError

    from chat_app.warmup import start_warmup

    auth = read_auth(args.auth)
    try:
        service, _ = build_service(settings)
    except LedgerError as err:  # the ledger cannot be used as it is: say why and what to do, no traceback
        logging.getLogger("app").error("%s", err)
        return 2
    with closing_on_stop(service, settings):
        launch(service, host=args.host, port=args.port, auth=auth, warmup=start_warmup(service))
    return 0


def console() -> None:
    """The ``rome-chat`` command (``pyproject.toml``): the same CLI and web app as ``python app.py``."""
    sys.exit(main())


if __name__ == "__main__":
    console()
