"""The loop on the demo router, with simulated reviewers, measured on tickets nobody trains on.

Reviewers are honest: they see tickets from the demo's *pool* served through the
normal serving path, and judge them only with the pool's labels (thumbs up when
the routed category is right, thumbs down with the right category as a
correction otherwise). Held-out tickets are used for measurement and nothing else.

    python -m flywheel.demo.simulate --turns 4 --traffic 16 --out docs/loop_scores.png

runs on a fresh temporary store unless --home is given.
"""

from __future__ import annotations

import argparse
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "production_version": self.production_version,
            "heldout_accuracy": self.heldout,
            "candidate_version": self.candidate_version,
            "candidate_heldout_accuracy": self.candidate_heldout,
            "promoted": self.promoted,
            "thumbs_up": self.traffic.thumbs_up if self.traffic else None,
            "thumbs_down": self.traffic.thumbs_down if self.traffic else None,
        }


def run_simulation(
    turns: int = 4,
    traffic: int = 16,
    *,
    optimizer: str = "LabeledFewShot",
    optimizer_params: dict[str, Any] | None = None,
    margin: float = 0.0,
    seed: int = 0,
    runtime: Runtime | None = None,
    report: Callable[[str], None] | None = print,
    progress: bool | Callable[[str], None] | None = False,
) -> list[TurnRecord]:
    """Turn 0 is the seeded Production version; each turn adds traffic + ratings, then runs the loop."""
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
            seed=seed,
            progress=progress,
        )
        candidate = result.candidate_version
        cand_acc = heldout_accuracy(candidate, runtime)
        runtime.store.client.set_model_version_tag(ROUTER_MODEL, candidate, HELDOUT_TAG, f"{cand_acc:.4f}")
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


def plot_scores(records: list[TurnRecord], path: str | Path | None = None) -> Any:
    """Held-out accuracy of the Production version after each turn, and of every candidate."""
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
    cands = [r for r in records if r.candidate_version is not None]
    for promoted, marker, label in ((True, "^", "candidate, promoted"), (False, "x", "candidate, refused")):
        chosen = [r for r in cands if r.promoted is promoted]
        if chosen:
            ax.scatter(
                [r.turn for r in chosen],
                [r.candidate_heldout for r in chosen],
                marker=marker,
                color="tab:orange" if promoted else "tab:red",
                label=label,
                zorder=3,
            )
    for r in cands:
        if not r.promoted:
            ax.annotate(
                f"v{r.candidate_version}",
                (r.turn, r.candidate_heldout or 0.0),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=9,
                color="tab:red",
            )
    ax.set(
        xlabel="loop turn",
        ylabel="held-out accuracy",
        ylim=(0, 1.05),
        xticks=xs,
        title="support-router: held-out accuracy per version (offline LM)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.demo.simulate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--traffic", type=int, default=16, help="rated predictions per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="FLYWHEEL_HOME to use (default: a fresh temporary one)")
    parser.add_argument("--out", default="docs/loop_scores.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # a script: write the file, open no window
    with tempfile.TemporaryDirectory(prefix="flywheel-sim-") as tmp:
        runtime = _runtime(Path(args.home or tmp))
        try:
            from flywheel.demo.seed import seed_demo

            seed_demo(runtime.store, progress=lambda line: None)
            records = run_simulation(args.turns, args.traffic, seed=args.seed, runtime=runtime)
            plot_scores(records, args.out)
        finally:
            runtime.close()
    print(f"saved {args.out}")
    for r in records:
        print(r.to_dict())
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
