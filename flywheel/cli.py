"""The `flywheel` command: thin subcommands over the package's helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from flywheel.config import Settings, get_settings, secret_values
from flywheel.errors import Cancelled, ConfigError, FlywheelError
from flywheel.limits import redact, redact_uri

Handler = Callable[[argparse.Namespace], int]


def _demo(args: argparse.Namespace) -> int:
    from flywheel.demo.seed import seed_demo
    from flywheel.demo.traffic import DEMO_REVIEWERS, seed_traffic
    from flywheel.store import connect

    store = connect()
    print(f"Seeding the demo into {redact_uri(store.tracking_uri)}")
    seed_demo(store)
    print("Traffic waiting for review:")
    seed_traffic(store)
    _print_models()
    print(
        "\nOpen the workbench (API, dashboards and MLflow UI) with:\n"
        f"  .venv/bin/flywheel up        (then rate as {' or '.join(DEMO_REVIEWERS)})"
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from flywheel.ui.workbench import run_workbench

    return run_workbench(
        host=args.host,
        api_port=args.api_port,
        dashboards_port=args.dashboards_port,
        mlflow_port=args.mlflow_port,
        preheat=args.preheat,
    )


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

    info = registry.promote(args.name, args.version, args.stage, actor=_actor(args), reason=args.reason or "")
    print(f"{info.name} version {info.version} -> {info.stage} (aliases: {', '.join(info.aliases)})")
    return 0


def _alias(args: argparse.Namespace) -> int:
    from flywheel import registry

    info = registry.set_alias(
        args.name, args.alias, args.version, actor=_actor(args), reason=args.reason or ""
    )
    print(f"{info.name} version {info.version} aliases: {', '.join(info.aliases)}")
    return 0


def _trust(args: argparse.Namespace) -> int:
    from flywheel import registry

    info = registry.trust(args.name, args.version, actor=_actor(args), reason=args.reason or "")
    print(f"{info.name} version {info.version} trusted: sha256 {info.tags[registry.CONTENT_TAG]}")
    return 0


def _actor(args: argparse.Namespace) -> str:
    import getpass

    if args.by:
        return str(args.by)
    try:
        return f"{getpass.getuser()} (cli)"
    except Exception:  # no user name on this host (a bare container)
        return "cli"


def _rollback(args: argparse.Namespace) -> int:
    from flywheel import rollback
    from flywheel.store import connect

    info = rollback.rollback(
        connect(), args.name, expected=args.expected, actor=_actor(args), reason=args.reason or ""
    )
    print(f"{info.name}: version {info.version} is Production again")
    return 0


def _canary(args: argparse.Namespace) -> int:
    from flywheel import canary
    from flywheel.store import connect

    share = 0.0 if args.off else args.share
    plan = canary.set_canary(
        connect(),
        args.name,
        None if args.off else args.ref,
        share,
        actor=_actor(args),
        reason=args.reason or "",
    )
    print(
        f"{args.name}: canary {plan.canary_ref or '-'} at {plan.share:.0%}; shadow {plan.shadow_ref or '-'}"
    )
    return 0


def _shadow(args: argparse.Namespace) -> int:
    from flywheel import canary
    from flywheel.store import connect

    plan = canary.set_shadow(
        connect(), args.name, None if args.off else args.ref, actor=_actor(args), reason=args.reason or ""
    )
    print(f"{args.name}: shadow {plan.shadow_ref or '-'}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from flywheel import audit, registry
    from flywheel.store import connect

    store = connect()
    registry.model_tags(args.name, store)  # an unknown model says so
    for e in audit.timeline(store, args.name, limit=args.limit):
        at = datetime.fromtimestamp(e.at_ms / 1000, tz=UTC)
        version = f"v{e.version}" if e.version else "-"
        print(f"{at:%Y-%m-%d %H:%M:%S}  {e.action:<9} {version:<5} by {e.actor}: {e.reason or '-'}")
        if e.evidence:
            print(f"    evidence: {json.dumps(e.evidence, sort_keys=True, default=str)}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from flywheel import rollback
    from flywheel.store import connect

    verdict = rollback.watch_once(connect(), args.name, watcher=_actor(args))
    print(json.dumps(verdict.to_dict(), indent=2, default=str))
    return 0


def _retention(args: argparse.Namespace) -> int:
    from flywheel import retention
    from flywheel.store import connect

    store = connect()
    if not retention.enabled(store.settings):
        print("retention is off: set FLYWHEEL_ARCHIVE_AFTER_DAYS and/or FLYWHEEL_DELETE_UNRATED_AFTER_DAYS")
        return 0
    report = retention.run(store, dry_run=args.dry_run, progress=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(("dry run, nothing changed\n" if args.dry_run else "") + "\n".join(report.lines()))
    return 0 if report.ok else 1


def _serve(args: argparse.Namespace) -> int:
    from flywheel.http.server import serve_foreground
    from flywheel.store import connect

    # a bad store is one clear line now, not a traceback in every worker; a host that connected
    # before starts during an outage and serves from its last-known-good state
    connect(allow_offline=True)
    serve_foreground(host=args.host, port=args.port, workers=args.workers)
    return 0


def _deliver(args: argparse.Namespace) -> int:
    import logging

    from flywheel.deliverer import run

    logging.basicConfig(level=logging.INFO)
    return run(parent=args.parent)


def dashboards_settings(args: argparse.Namespace) -> Settings:
    """The settings `flywheel dashboards` runs Voila with: `--auth proxy` signs users in by the
    header a reverse proxy sets (`--reviewer-header`), honoured only from `--trusted-proxies`."""
    from dataclasses import replace

    settings = get_settings()
    if args.auth != "proxy":
        if args.reviewer_header or args.trusted_proxies:
            raise ConfigError("--reviewer-header and --trusted-proxies go with --auth proxy")
        return settings
    header = (args.reviewer_header or settings.flywheel_reviewer_header or "").strip()
    if not header:
        raise ConfigError(
            "--auth proxy needs the header your proxy sets: --reviewer-header X-Forwarded-User "
            "(or FLYWHEEL_REVIEWER_HEADER)"
        )
    proxies = (args.trusted_proxies or settings.flywheel_trusted_proxies).strip()
    return replace(settings, flywheel_reviewer_header=header, flywheel_trusted_proxies=proxies)


def _dashboards(args: argparse.Namespace) -> int:
    from flywheel.ui.dashboards import launch

    settings = dashboards_settings(args)
    launch(
        port=args.port,
        open_api=not args.no_api,
        host=args.host,
        api_port=args.api_port,
        preheat=settings.flywheel_preheat_kernels,
        settings=settings,
    )
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
    p.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    p.add_argument("--by", default=None, help="who (default: your user name)")
    p.set_defaults(handler=_promote)
    p = sub.add_parser("serve", help="run the HTTP API in the foreground (API_HOST/API_PORT/API_WORKERS)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default API_WORKERS)")
    p.set_defaults(handler=_serve)
    p = sub.add_parser(
        "deliver",
        help="deliver this host's outbox to MLflow until SIGTERM; while another holds "
        "FLYWHEEL_HOME/deliverer.lock, stand by (warm) to take over when it dies "
        "(`serve` runs and restarts two itself)",
    )
    p.add_argument("--parent", type=int, default=None, help="stop (after draining) when this process is gone")
    p.set_defaults(handler=_deliver)
    p = sub.add_parser(
        "dashboards", help="serve the reviewer dashboards with Voila (and the API) until Ctrl-C"
    )
    p.add_argument("--port", type=int, default=8866, help="Voila's port (another free one when taken)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=None, help="the API's port (default API_PORT)")
    p.add_argument("--no-api", action="store_true", help="do not start the API beside the dashboards")
    p.add_argument(
        "--auth",
        choices=("token", "proxy"),
        default="token",
        help="token (default): every page needs the dashboards' token (FLYWHEEL_DASHBOARDS_TOKEN, or one "
        "made per start, printed in the URLs); proxy: a reverse proxy signs users in with the header "
        "--reviewer-header, honoured only from --trusted-proxies (the token still opens pages, as nobody)",
    )
    p.add_argument(
        "--reviewer-header", default=None, help="--auth proxy: the header the proxy sets (X-Forwarded-User)"
    )
    p.add_argument(
        "--trusted-proxies",
        default=None,
        help="--auth proxy: the proxy's addresses or networks, comma-separated (default: loopback)",
    )
    p.set_defaults(handler=_dashboards)
    p = sub.add_parser(
        "up", help="the workbench: the API, the dashboards (Voila) and the MLflow UI until Ctrl-C"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=None, help="the API's port (default API_PORT)")
    p.add_argument("--dashboards-port", type=int, default=8866, help="Voila's port (another when taken)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="the MLflow UI's port (another when taken)")
    p.add_argument(
        "--preheat",
        type=int,
        default=None,
        help="preheated Voila kernels per dashboard (default FLYWHEEL_PREHEAT_KERNELS)",
    )
    p.set_defaults(handler=_up)
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
    p.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    p.add_argument("--by", default=None, help="who (default: your user name)")
    p.set_defaults(handler=_alias)
    p = sub.add_parser(
        "trust",
        help="adopt a version flywheel did not register (or whose files changed), after inspecting it",
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    p.add_argument("--by", default=None, help="who (default: your user name)")
    p.set_defaults(handler=_trust)
    p = sub.add_parser(
        "rollback", help="put the version the current Production replaced back into Production"
    )
    p.add_argument("name")
    p.add_argument("--expected", default=None, help="only while this version is Production")
    p.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    p.add_argument("--by", default=None, help="who (default: your user name)")
    p.set_defaults(handler=_rollback)
    p = sub.add_parser(
        "canary", help="send a share of the unpinned traffic to a reference (e.g. alias canary)"
    )
    p.add_argument("name")
    p.add_argument("ref", nargs="?", default="canary")
    p.add_argument("--share", type=float, default=0.1, help="0 to 1 (default 0.1)")
    p.add_argument("--off", action="store_true", help="end the canary")
    p.add_argument("--reason", default=None)
    p.add_argument("--by", default=None)
    p.set_defaults(handler=_canary)
    p = sub.add_parser(
        "shadow", help="run a reference beside Production on the same inputs (answer discarded)"
    )
    p.add_argument("name")
    p.add_argument("ref", nargs="?", default="candidate")
    p.add_argument("--off", action="store_true", help="stop the shadow")
    p.add_argument("--reason", default=None)
    p.add_argument("--by", default=None)
    p.set_defaults(handler=_shadow)
    p = sub.add_parser(
        "audit", help="the model's audit trail: promotions, rollbacks, alias and traffic changes"
    )
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_audit)
    p = sub.add_parser(
        "watch", help="one look of the rollback watcher at a model (rolls back when shown worse)"
    )
    p.add_argument("name")
    p.add_argument("--by", default=None)
    p.set_defaults(handler=_watch)
    p = sub.add_parser(
        "retention",
        help="one retention pass: delete old unrated traces, archive old span payloads (see docs/deploy.md)",
    )
    p.add_argument("--dry-run", action="store_true", help="count what a pass would do; change nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_retention)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        get_settings()
        return handler(args)
    except ConfigError as exc:  # messages redacted (a password in a URI), whoever wrote them
        print(f"flywheel: configuration error: {redact(str(exc), secret_values())}", file=sys.stderr)
        return 2
    except FlywheelError as exc:  # raised on purpose: its message is one line for a person
        print(f"flywheel: {redact(str(exc), secret_values())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
