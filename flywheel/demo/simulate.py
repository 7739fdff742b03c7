"""The loop on the demo router, with simulated reviewers, measured on tickets nobody trains on.

Reviewers are honest: they see tickets from the demo's *pool* served through the
normal serving path, and judge them only with the pool's labels (thumbs up when
the routed category is right, thumbs down with the right category as a
correction otherwise). Held-out tickets are used for measurement and nothing else.

    python -m flywheel.demo.simulate --turns 4 --traffic 16 --out loop_scores.png
    python -m flywheel.demo.simulate --turns 5 --traffic 24 --dev-fraction 0.5 --seed 1 2 3 \
        --out docs/loop_seeds.png

runs each seed on a fresh temporary store unless --home is given (one seed only). The
gate's rules come from the GATE_* settings (environment or .env), printed at the start.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel import registry
from flywheel.demo.data import ticket_splits
from flywheel.demo.seed import ROUTER_MODEL, accuracy
from flywheel.loop import LoopTurn
from flywheel.runtime import Runtime, get_runtime

HELDOUT_TAG = "demo.heldout_accuracy"
REVIEWER = "simulated-reviewer"


@dataclass(frozen=True)
class Traffic:
    predictions: int
    thumbs_up: int
    thumbs_down: int


def simulate_reviews(
    n: int, *, seed: int = 0, model: str = ROUTER_MODEL, runtime: Runtime | None = None
) -> Traffic:
    """`n` pool tickets through serving.predict, each rated against the pool's label."""
    runtime = runtime or get_runtime()
    pool, _ = ticket_splits()
    up = down = 0
    for row in random.Random(seed).sample(pool, min(n, len(pool))):
        served = runtime.predict(model, {"ticket": row["ticket"]})
        routed, right = served.result.get("category"), row["category"]
        if routed == right:
            runtime.submit_feedback(served.trace_id, "thumbs_up", user_id=REVIEWER)
            up += 1
        else:
            comment = f"This is a {right} ticket, not {routed}."
            runtime.submit_feedback(
                served.trace_id,
                "thumbs_down",
                corrected_output={"category": right},
                comment=comment,
                user_id=REVIEWER,
            )
            down += 1
    runtime.outbox.flush()
    return Traffic(up + down, up, down)


def heldout_accuracy(ref: str | int, runtime: Runtime, model: str = ROUTER_MODEL) -> float:
    _, heldout = ticket_splits()
    return round(accuracy(runtime.programs.load(model, ref).program, heldout, runtime.lm), 4)


@dataclass(frozen=True)
class TurnRecord:
    turn: int
    production_version: str
    heldout: float
    candidate_version: str | None = None
    candidate_heldout: float | None = None
    promoted: bool = False
    traffic: Traffic | None = None
    turn_result: LoopTurn | None = None

    @property
    def verdict(self) -> str | None:
        return self.turn_result.verdict if self.turn_result else None

    def to_dict(self) -> dict[str, Any]:
        gate = self.turn_result.gate if self.turn_result else None
        c = gate.comparison if gate else None
        return {
            "turn": self.turn,
            "production_version": self.production_version,
            "heldout_accuracy": self.heldout,
            "candidate_version": self.candidate_version,
            "candidate_heldout_accuracy": self.candidate_heldout,
            "verdict": self.verdict,
            "promoted": self.promoted,
            "thumbs_up": self.traffic.thumbs_up if self.traffic else None,
            "thumbs_down": self.traffic.thumbs_down if self.traffic else None,
            "gate_rows": c.rows if c else None,
            "gate_wins": c.wins if c else None,
            "gate_losses": c.losses if c else None,
            "gate_p_value": c.p_better if c else None,
            "gate_rows_needed": c.rows_needed if c else None,
        }


def run_simulation(
    turns: int = 4,
    traffic: int = 16,
    *,
    optimizer: str = "LabeledFewShot",
    optimizer_params: dict[str, Any] | None = None,
    margin: float | None = None,
    dev_fraction: float = 0.25,
    seed: int = 0,
    runtime: Runtime | None = None,
    report: Callable[[str], None] | None = print,
    progress: bool | Callable[[str], None] | None = False,
) -> list[TurnRecord]:
    """Turn 0 is the seeded Production version; each turn adds traffic + ratings, then runs the loop.

    The gate's rules are the runtime's GATE_* settings (`margin` None: GATE_MARGIN).
    """
    runtime = runtime or get_runtime()
    say = report or (lambda line: None)
    production = registry.resolve(ROUTER_MODEL, "Production", runtime.store).version
    records = [TurnRecord(0, production, heldout_accuracy(production, runtime))]
    say(f"turn 0: Production v{production}, held-out accuracy {records[0].heldout:.3f}")
    for turn in range(1, turns + 1):
        seen = simulate_reviews(traffic, seed=seed * 1000 + turn, runtime=runtime)
        result = runtime.loop(
            ROUTER_MODEL,
            optimizer=optimizer,
            optimizer_params=optimizer_params,
            margin=margin,
            dev_fraction=dev_fraction,
            seed=seed,
            progress=progress,
        )
        candidate = result.candidate_version
        cand_acc = None
        if candidate is not None:  # None: the compile got no answers (LM down), nothing registered
            cand_acc = heldout_accuracy(candidate, runtime)
            runtime.store.client.set_model_version_tag(
                ROUTER_MODEL, candidate, HELDOUT_TAG, f"{cand_acc:.4f}"
            )
        production = registry.resolve(ROUTER_MODEL, "Production", runtime.store).version
        record = TurnRecord(
            turn,
            production,
            heldout_accuracy(production, runtime),
            candidate,
            cand_acc,
            result.promoted,
            seen,
            result,
        )
        records.append(record)
        say(
            f"turn {turn}: {seen.thumbs_up} up / {seen.thumbs_down} down -> {result.summary()}; "
            f"held-out accuracy of Production v{production}: {record.heldout:.3f}"
        )
    return records


_MARKS = {  # verdict -> marker, colour, legend label
    "promote": ("^", "tab:green", "candidate, promoted"),
    "refuse": ("x", "tab:red", "candidate, refused"),
    "inconclusive": ("o", "tab:gray", "candidate, inconclusive (kept Production)"),
}


def plot_scores(records: list[TurnRecord], path: str | Path | None = None) -> Any:
    """Held-out accuracy of the Production version after each turn, and of every candidate by verdict."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.turn for r in records]
    ax.plot(xs, [r.heldout for r in records], "o-", color="tab:blue", label="Production (after the turn)")
    for r in records:
        ax.annotate(
            f"v{r.production_version}",
            (r.turn, r.heldout),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=9,
        )
    _candidates(ax, records, annotate=True)
    ax.set(
        xlabel="loop turn",
        ylabel="held-out accuracy",
        ylim=(0, 1.05),
        xticks=xs,
        title="support-router: held-out accuracy per version (offline LM)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _candidates(ax: Any, records: list[TurnRecord], annotate: bool = False, offset: float = 0.0) -> None:
    cands = [r for r in records if r.candidate_version is not None and r.candidate_heldout is not None]
    for verdict, (marker, colour, label) in _MARKS.items():
        chosen = [r for r in cands if r.verdict == verdict]
        if chosen:
            ax.scatter(
                [r.turn + offset for r in chosen],
                [r.candidate_heldout for r in chosen],
                marker=marker,
                color=colour,
                facecolors="none" if verdict == "inconclusive" else None,
                label=label,
                zorder=3,
            )
    if annotate:
        for r in cands:
            if not r.promoted:
                ax.annotate(
                    f"v{r.candidate_version}",
                    (r.turn + offset, r.candidate_heldout or 0.0),
                    textcoords="offset points",
                    xytext=(0, -14),
                    ha="center",
                    fontsize=8,
                    color=_MARKS.get(r.verdict or "", ("", "tab:gray", ""))[1],
                )


def plot_seeds(
    runs: dict[int, list[TurnRecord]] | dict[int, list[dict[str, Any]]],
    path: str | Path | None = None,
    note: str = "",
) -> Any:
    """Every seed in one figure: a line per seed for Production's held-out accuracy after each turn,
    and each turn's candidate in the seed's colour, its marker saying the gate's verdict (nudged
    sideways per seed so they do not overlap). Takes TurnRecords or their `to_dict()` rows (a
    saved --json), so a figure can be redrawn without rerunning."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8.5, 5))
    colours = plt.get_cmap("tab10")
    seeds = sorted(runs)
    turns: set[int] = set()
    handles: list[Any] = []
    for i, seed in enumerate(seeds):
        rows = [r.to_dict() if isinstance(r, TurnRecord) else r for r in runs[seed]]
        offset = (i - (len(seeds) - 1) / 2) * 0.09
        xs = [r["turn"] + offset for r in rows]
        turns.update(r["turn"] for r in rows)
        accuracies = [r["heldout_accuracy"] for r in rows]
        (line,) = ax.plot(xs, accuracies, "o-", color=colours(i), lw=2, ms=5, zorder=2)
        handles.append((line, f"seed {seed}: Production ({accuracies[0]:.3f} -> {accuracies[-1]:.3f})"))
        for r, x in zip(rows, xs, strict=True):
            if r.get("candidate_heldout_accuracy") is None or r.get("verdict") not in _MARKS:
                continue
            marker = _MARKS[r["verdict"]][0]
            ax.scatter(
                [x],
                [r["candidate_heldout_accuracy"]],
                marker=marker,
                s=45,
                color=colours(i),
                facecolors="none" if r["verdict"] == "inconclusive" else colours(i),
                zorder=3,
            )
    for verdict, (marker, _, label) in _MARKS.items():
        fill = "none" if verdict == "inconclusive" else "0.35"
        symbol = Line2D([], [], ls="", marker=marker, color="0.35", mfc=fill)
        handles.append((symbol, label))
    ax.legend([h for h, _ in handles], [t for _, t in handles], loc="lower right", fontsize=8)
    ax.set(
        xlabel="loop turn",
        ylabel="held-out accuracy (21 tickets)",
        ylim=(0, 1.05),
        xticks=sorted(turns),
    )
    seeds_text = ", ".join(map(str, seeds))
    ax.set_title(f"support-router: Production per turn under the paired gate, seeds {seeds_text}")
    if note:
        ax.text(0.01, 0.985, note, transform=ax.transAxes, fontsize=7.5, color="0.3", va="top")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def gate_settings_line(runtime: Runtime) -> str:
    s = runtime.store.settings
    return (
        f"GATE_ALPHA={s.gate_alpha} GATE_MARGIN={s.gate_margin} GATE_MIN_ROWS={s.gate_min_rows} "
        f"GATE_NON_INFERIORITY={str(s.gate_non_inferiority).lower()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.demo.simulate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--traffic", type=int, default=16, help="rated predictions per turn")
    parser.add_argument("--dev-fraction", type=float, default=0.25, help="share of new rated rows held out")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (one figure)")
    parser.add_argument("--home", help="FLYWHEEL_HOME to use (default: a fresh temporary one per seed)")
    parser.add_argument("--out", default="loop_scores.png")
    parser.add_argument("--json", help="also write every turn of every seed to this JSON file")
    parser.add_argument("--replot", metavar="JSON", help="only redraw --out from a saved --json (no run)")
    parser.add_argument("--note", default=None, help="with --replot: the line of settings under the title")
    args = parser.parse_args(argv)
    if args.replot:
        import matplotlib

        matplotlib.use("Agg")
        with open(args.replot, encoding="utf-8") as handle:
            saved = {int(k): v for k, v in json.load(handle).items()}
        plot_seeds(saved, args.out, note=args.note or "")
        print(f"saved {args.out}")
        return 0
    if args.home and len(args.seed) > 1:
        parser.error("--home takes one seed (each seed needs a fresh store)")
    import matplotlib

    matplotlib.use("Agg")  # a script: write the file, open no window
    from flywheel.demo.seed import seed_demo

    runs: dict[int, list[TurnRecord]] = {}
    settings = ""
    for seed in args.seed:
        with tempfile.TemporaryDirectory(prefix="flywheel-sim-") as tmp:
            runtime = _runtime(Path(args.home or tmp))
            try:
                settings = gate_settings_line(runtime)
                print(
                    f"seed {seed}: --turns {args.turns} --traffic {args.traffic} "
                    f"--dev-fraction {args.dev_fraction}; {settings}",
                    flush=True,
                )
                seed_demo(runtime.store, progress=lambda line: None)
                runs[seed] = run_simulation(
                    args.turns,
                    args.traffic,
                    dev_fraction=args.dev_fraction,
                    seed=seed,
                    runtime=runtime,
                    report=lambda line: print(line, flush=True),
                )
            finally:
                runtime.close()
    if len(runs) == 1:
        plot_scores(next(iter(runs.values())), args.out)
    else:
        note = f"traffic {args.traffic}/turn, dev fraction {args.dev_fraction}; {settings}"
        plot_seeds(runs, args.out, note=note)
    print(f"saved {args.out}")
    for seed, records in runs.items():
        print(f"seed {seed}: " + " -> ".join(f"{r.heldout:.3f}" for r in records))
        for r in records:
            print(r.to_dict())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({str(k): [r.to_dict() for r in v] for k, v in runs.items()}, handle, indent=1)
    return 0


def _runtime(home: Path) -> Runtime:
    """A runtime on an embedded store under `home`, whatever store the environment names."""
    from dataclasses import replace

    from flywheel.config import get_settings

    home = home.expanduser().resolve()
    settings = replace(
        get_settings(), flywheel_home=home, mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}"
    )
    return Runtime(settings).start()


if __name__ == "__main__":
    raise SystemExit(main())
