"""`fastserve report RUN_DIR...`: a Markdown report with PNG plots for run folders, so a
nightly job leaves something a person can open in the morning.

fastserve report out/                        # -> out/_report/report.md
fastserve report runs/clf out/ --out report/ # training and inference runs together

Inference run folders give rows in/out/rejected, throughput per shard and the rejected rows by
reason; training run folders (metrics.jsonl) give the loss per step and the validation figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from fastserve.pipeline.counts import Counts
from fastserve.pipeline.errors import UserError
from fastserve.pipeline.manifest import RunDir
from fastserve.pipeline.models.int8_check import describe as describe_int8
from fastserve.pipeline.models.int8_check import summarize as summarize_int8

from .progress import startup_line, usage_line


@dataclass
class InferRun:
    path: Path
    task: str
    model: str
    shards_planned: int
    records: list[dict]
    summaries: list[dict] = field(default_factory=list)
    dtype: str = "auto"

    @property
    def int8_check(self) -> dict | None:
        """dtype int8: the workers' checks against float32, added up."""
        return summarize_int8(self.records)

    @property
    def counts(self) -> Counts:
        return Counts.total(self.records)

    @property
    def wall_seconds(self) -> float:
        """From the first shard's start to the last shard's end (over every run of the folder)."""
        if not self.records:
            return 0.0
        return max(r["finished"] for r in self.records) - min(r["started"] for r in self.records)


@dataclass
class TrainRun:
    path: Path
    metrics: list[dict]

    @property
    def last_val(self) -> dict:
        vals = [m for m in self.metrics if "val_loss" in m]
        return vals[-1] if vals else {}


def load_run(path: str | Path) -> InferRun | TrainRun:
    """An inference run folder (_manifest/run.json) or a training one (metrics.jsonl)."""
    p = Path(path)
    if (p / "metrics.jsonl").exists():
        lines = (p / "metrics.jsonl").read_text().splitlines()
        return TrainRun(p, [json.loads(line) for line in lines if line.strip()])
    run = RunDir.at(p)
    info = run.read_run()
    if info is None:
        raise UserError(
            f"{path}: not a FastServe run folder (no _manifest/run.json and no metrics.jsonl); "
            "pass an infer --output folder or a train output.path folder"
        )
    from fastserve.pipeline.ledger import complete_records, read_ledger

    live = read_ledger(run.plan_dir).live
    records = list(complete_records(run, info["fingerprint"]["sha"]).values())
    records.sort(key=lambda r: r["started"])
    summaries = [e for e in run.run_entries() if "finished" in e]
    fields_ = info["fingerprint"]["fields"]
    return InferRun(
        p,
        fields_["task"],
        fields_["model"],
        len(live),
        records,
        summaries,
        fields_.get("model.dtype", "auto"),
    )


# -- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure():
    plt = _pyplot()
    return plt.subplots(figsize=(7, 4))


def _save(fig, ax, path: Path, grid: bool = True) -> Path:
    if grid:
        ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_training(runs: list[TrainRun], path: Path) -> Path | None:
    if not runs:
        return None
    fig, ax = _figure()
    for run in runs:
        steps = [m["step"] for m in run.metrics]
        (line,) = ax.plot(steps, [m["loss"] for m in run.metrics], label=f"{run.path.name} train")
        vals = [m for m in run.metrics if "val_loss" in m]
        if vals:
            ax.plot([m["step"] for m in vals], [m["val_loss"] for m in vals], "o--",
                    color=line.get_color(), label=f"{run.path.name} validation")  # fmt: skip
    ax.set(xlabel="step", ylabel="loss", title="Training loss per step")
    return _save(fig, ax, path)


def plot_throughput(runs: list[InferRun], path: Path) -> Path | None:
    runs = [r for r in runs if r.records]
    if not runs:
        return None
    fig, ax = _figure()
    for run in runs:
        rates = [
            r["rows_in"] / r["seconds"]["model"] for r in run.records if r["seconds"].get("model")
        ]
        ax.plot(range(1, len(rates) + 1), rates, "o-", label=f"{run.path.name} ({run.task})")
    ax.set(xlabel="shard (in order of start)", ylabel="rows/s of model time",
           title="Throughput per shard")  # fmt: skip
    ax.set_yscale("log")
    return _save(fig, ax, path)


def plot_rejected(runs: list[InferRun], path: Path) -> Path | None:
    reasons = sorted({k for r in runs for k in r.counts.rejected_by_reason})
    if not reasons:
        return None
    fig, ax = _figure()
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(reasons))]
        rejected = run.counts.rejected_by_reason
        ax.bar(xs, [rejected.get(k, 0) for k in reasons], width, label=run.path.name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(reasons))], reasons)
    ax.set(ylabel="rows", title="Rejected rows by reason (kept in _rejected/)")
    return _save(fig, ax, path, grid=False)


# -- the Markdown ------------------------------------------------------------------------------


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


def markdown(runs: list, images: list[Path], title: str, extra: str = "") -> str:
    infer = [r for r in runs if isinstance(r, InferRun)]
    train = [r for r in runs if isinstance(r, TrainRun)]
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    if extra:
        lines += [extra.rstrip(), ""]
    if infer:
        lines += [
            "## Inference",
            "",
            "| run | task | shards | rows in | out | rejected | rows/s (model) | tokens/s (model) | wall s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in infer:
            c = r.counts
            lines.append(
                f"| `{r.path}` | {r.task} | {c.shards}/{r.shards_planned} | {c.rows_in:,} "
                f"| {c.rows_out:,} | {c.rows_rejected:,} | {_rate(c.rows_in, c.model_seconds)} "
                f"| {_rate(c.tokens, c.model_seconds)} | {r.wall_seconds:.1f} |"
            )
        for r in infer:
            if r.counts.usage:
                lines.append(f"\n`{r.path.name}` {usage_line(r.counts.usage)}.")
            check = r.int8_check
            if check:
                lines.append(
                    f"\n`{r.path.name}` ({r.dtype}) {describe_int8(check, check['threshold'])}."
                )
            if r.counts.rejected_by_reason:
                why = ", ".join(f"{k} {v}" for k, v in r.counts.rejected_by_reason.items())
                lines.append(f"\n`{r.path.name}` rejected: {why} (rows in `_rejected/`).")
            if r.summaries:
                lines += ["", f"Runs of `{r.path.name}`:", ""]
                for s in r.summaries[-10:]:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["started"]))
                    p = s["processed"]
                    lines.append(
                        f"- {when}: {p['shards']} shards, {p['rows_out']:,} rows out, "
                        f"{p['rows_rejected']:,} rejected"
                        + (", interrupted" if s.get("interrupted") else "")
                        + (f", {len(s['failed'])} failed" if s.get("failed") else "")
                        + (
                            f"; start-up {startup_line(s['startup'])}"
                            if (s.get("startup") or {}).get("first_batch")
                            else ""
                        )
                    )
        lines.append("")
    if train:
        lines += [
            "## Training",
            "",
            "| run | steps | last loss | validation |",
            "|---|---|---|---|",
        ]
        for r in train:
            v = r.last_val
            val = (
                f"loss {v['val_loss']:.3f}"
                + (f", accuracy {v['val_accuracy']:.1%}" if "val_accuracy" in v else "")
                + (f", perplexity {v['val_perplexity']:.1f}" if "val_perplexity" in v else "")
                if v
                else "-"
            )
            last = r.metrics[-1] if r.metrics else {}
            lines.append(
                f"| `{r.path}` | {last.get('step', 0)} | {last.get('loss', float('nan')):.3f} | {val} |"
            )
        lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines)


def write_report(
    run_dirs: list[str | Path], out: str | Path, title: str = "FastServe report", extra: str = ""
) -> Path:
    """report.md and its PNGs in `out`; returns the Markdown's path."""
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infer = [r for r in runs if isinstance(r, InferRun)]
    images = [
        p
        for p in (
            plot_training([r for r in runs if isinstance(r, TrainRun)], out / "training_loss.png"),
            plot_throughput(infer, out / "throughput.png"),
            plot_rejected(infer, out / "rejected.png"),
        )
        if p is not None
    ]
    path = out / "report.md"
    path.write_text(markdown(runs, images, title, extra))
    return path


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Report folder [RUN_DIR/_report for one run folder, ./fastserve-report for several].",
)
@click.option("--title", default="FastServe report", show_default=True)
def report(run_dirs: tuple[str, ...], out: str | None, title: str) -> None:
    """Write a Markdown report with plots (throughput per shard, rejected rows by reason,
    training loss per step) for inference and training run folders."""
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"{d}: no such folder; pass run folders (infer outputs, train outputs)")
    out = out or (str(Path(run_dirs[0]) / "_report") if len(run_dirs) == 1 else "fastserve-report")
    click.echo(f"report: {write_report(list(run_dirs), out, title)}")
