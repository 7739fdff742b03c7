"""The `flywheel` command: thin subcommands over the package's helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from flywheel.config import get_settings
from flywheel.errors import Cancelled, ConfigError, FlywheelError

Handler = Callable[[argparse.Namespace], int]


def _demo(args: argparse.Namespace) -> int:
    from flywheel.demo.seed import seed_demo
    from flywheel.store import connect

    store = connect()
    print(f"Seeding the demo into {store.tracking_uri}")
    seed_demo(store)
    _print_models()
    home = store.settings.flywheel_home
    print(
        "\nBrowse it in the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {store.tracking_uri} "
        f"--default-artifact-root {(home / 'artifacts').as_uri()}"
    )
    return 0


def _print_models() -> None:
    from flywheel import registry

    for model in registry.list_models():
        print(f"\n{model.name}: {model.description}".rstrip(": "))
        for v in registry.list_versions(model.name):
            aliases = ", ".join(v.aliases) or "-"
            score = "-" if v.score is None else f"{v.score:.3f}"
            print(
                f"  v{v.version:<3} {v.stage:<10} aliases: {aliases:<22} score: {score:<6} "
                f"{v.created_at:%Y-%m-%d %H:%M}  {v.description}"
            )


def _models(args: argparse.Namespace) -> int:
    from flywheel.store import connect

    connect()
    _print_models()
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flywheel import registry

    info = registry.promote(args.name, args.version, args.stage)
    print(f"{info.name} version {info.version} -> {info.stage} (aliases: {', '.join(info.aliases)})")
    return 0


def _alias(args: argparse.Namespace) -> int:
    from flywheel import registry

    info = registry.set_alias(args.name, args.alias, args.version)
    print(f"{info.name} version {info.version} aliases: {', '.join(info.aliases)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flywheel.http.server import serve_foreground
    from flywheel.store import connect

    # a bad store is one clear line now, not a traceback in every worker; a host that connected
    # before starts during an outage and serves from its last-known-good state
    connect(allow_offline=True)
    serve_foreground(host=args.host, port=args.port, workers=args.workers)
    return 0


def _dashboards(args: argparse.Namespace) -> int:
    from flywheel.ui.dashboards import launch

    launch(port=args.port, open_api=not args.no_api, host=args.host, api_port=args.api_port)
    return 0


def _param(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _loop(args: argparse.Namespace) -> int:
    from flywheel.runtime import Runtime

    try:
        with Runtime() as runtime:
            turn = runtime.loop(
                args.name,
                optimizer=args.optimizer,
                optimizer_params=dict(args.param),
                metric=args.metric,
                target_stage=args.stage,
                margin=args.margin,
                alpha=args.alpha,
                min_rows=args.min_rows,
                non_inferiority=args.non_inferiority,
                dev_fraction=args.dev_fraction,
                seed=args.seed,
                progress=lambda line: print(line, file=sys.stderr),
            )
    except (Cancelled, KeyboardInterrupt):
        print("flywheel: loop cancelled; nothing was registered", file=sys.stderr)
        return 130
    print(turn.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("demo", help="seed the store with the demo programs (idempotent)").set_defaults(
        handler=_demo
    )
    sub.add_parser("models", help="list registered models and their versions").set_defaults(handler=_models)
    p = sub.add_parser("promote", help="move a version to a stage (None/Staging/Production/Archived)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("stage")
    p.set_defaults(handler=_promote)
    p = sub.add_parser("serve", help="run the HTTP API in the foreground (API_HOST/API_PORT/API_WORKERS)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default API_WORKERS)")
    p.set_defaults(handler=_serve)
    p = sub.add_parser(
        "dashboards", help="serve the reviewer dashboards with Voila (and the API) until Ctrl-C"
    )
    p.add_argument("--port", type=int, default=8866, help="Voila's port (another free one when taken)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=None, help="the API's port (default API_PORT)")
    p.add_argument("--no-api", action="store_true", help="do not start the API beside the dashboards")
    p.set_defaults(handler=_dashboards)
    p = sub.add_parser(
        "loop", help="one turn: export ratings -> compile -> paired gate -> promote if significantly better"
    )
    p.add_argument("name")
    p.add_argument("--optimizer", default="LabeledFewShot")
    p.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="an optimizer parameter, e.g. --param k=16 (repeatable; values parsed as JSON)",
    )
    p.add_argument("--metric", default="exact_match", choices=["exact_match", "f1", "judge"])
    p.add_argument("--stage", default="Production", help="Staging or Production")
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="improvement the candidate must show with significance (default GATE_MARGIN); "
        "with --non-inferiority, the loss it may have",
    )
    p.add_argument("--alpha", type=float, default=None, help="significance level (default GATE_ALPHA)")
    p.add_argument(
        "--min-rows", type=int, default=None, help="fewest held-out rows to decide on (default GATE_MIN_ROWS)"
    )
    p.add_argument(
        "--non-inferiority",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="promote when not worse by more than the margin (default GATE_NON_INFERIORITY)",
    )
    p.add_argument("--dev-fraction", type=float, default=0.25, help="share of new rated rows held out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_loop)
    p = sub.add_parser("alias", help="point a free alias (e.g. champion) at a version")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version")
    p.set_defaults(handler=_alias)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        get_settings()
        return handler(args)
    except ConfigError as exc:
        print(f"flywheel: configuration error: {exc}", file=sys.stderr)
        return 2
    except FlywheelError as exc:  # raised on purpose: its message is one line for a person
        print(f"flywheel: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
