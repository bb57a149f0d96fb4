"""`fastserve train`: model-parallel training over MPI ranks, then export for `fastserve infer`.

    mpiexec -n 2 fastserve train --config train.toml           # e.g. parallel.pp = 2
    srun --mpi=pmi2 -n 8 fastserve train --config train.toml   # on a Slurm allocation
    fastserve train --config train.toml --dry-run              # the plan, no ranks needed

The run folder gets metrics.jsonl, checkpoints/ and, at the end, export/ (a FastServe checkpoint
that `fastserve infer --task generate --model <run>/export` serves). Exit code 75 means "saved a
checkpoint on SIGTERM/SIGUSR1; requeue me": rerunning resumes from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastserve.pipeline.errors import UserError
from fastserve.pipeline.training.config import load_train_job

from .sbatch import LAUNCH_TABLES


def _overrides(data, output, steps) -> dict:
    out: dict = {}
    if data:
        out.setdefault("data", {})["paths"] = list(data)
    if output:
        out.setdefault("output", {})["path"] = output
    if steps:
        out.setdefault("train", {})["steps"] = steps
    return out


def plan_text(job) -> str:
    """The plan: stages, shards and a memory estimate per rank (fp32 weights, grads, AdamW)."""
    from fastserve.pipeline.distributed.parallelize import stage_layers
    from fastserve.pipeline.training.model_factory import build_model

    p, m = job.parallel, job.model
    if m.init_from:  # sizes from the folder; the model on the meta device (nothing allocated)
        from dataclasses import replace

        from fastserve.pipeline.models.hf_format import build_from_hf

        arch, cfg, model = build_from_hf(m.init_from)
        m = replace(m, arch=arch, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    else:
        model = build_model(m, job.data.vocab_size, job.train.seed)
    n_stages = p.pp * p.stages_per_rank
    stages = stage_layers(m.n_layer, n_stages)
    from fastserve.pipeline.training.checkpoints import latest_complete
    from fastserve.pipeline.training.data import check_corpus

    d = job.data
    label = d.label_column if m.arch == "classifier" else None
    columns = tuple(c for c in (d.prompt_column, d.response_column, d.messages_column) if c)
    text = None if columns else d.text_column  # instruction data has its own columns
    corpus = check_corpus(d.paths, text, label, columns)  # footers only: no rows read
    out = Path(job.output.path)
    passed_over: list[str] = []
    last = latest_complete(out, warn=passed_over.append) if out.is_dir() else None
    lines = [
        *passed_over,
        f"corpus: {corpus['files']} files, {corpus['rows']} rows ("
        + (f"columns {', '.join(columns)}" if columns else f"text column {d.text_column!r}")
        + (f", labels {label!r}" if label else "")
        + ")",
        f"run folder: {out} ("
        + (_resume_text(last, job, m.arch) if last else "exists" if out.is_dir() else "new")
        + ")",
        f"world size {p.dp * p.tp * p.pp} = dp {p.dp} x tp {p.tp} x pp {p.pp}  (launch: mpiexec -n {p.dp * p.tp * p.pp})",
        f"model {m.arch}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters"
        + (f" (from {m.init_from})" if m.init_from else ""),
    ]
    per_layer = {
        i: sum(q.numel() for q in model.layers[str(i)].parameters()) for i in range(m.n_layer)
    }
    emb = sum(q.numel() for n, q in model.named_parameters() if not n.startswith("layers."))
    for s, layers in enumerate(stages):
        params = sum(per_layer[i] for i in layers) + (emb if s in (0, n_stages - 1) else 0)
        shard = params / p.tp / (p.dp if p.dp_mode == "fsdp" else 1)
        mem = shard * 4 * 4 / 2**20  # weights + grads + 2 AdamW moments, fp32
        rank = s % p.pp
        lines.append(
            f"stage {s} (pp rank {rank}): layers {layers[0]}-{layers[-1]}, {params / 1e6:.2f}M params, "
            f"~{mem:.1f} MiB per rank for weights/grads/optimizer (+ activations)"
        )
    if p.pp > 1:
        from fastserve.pipeline.training.trainer import bubble_fraction

        lines.append(
            f"schedule {p.schedule}, {p.microbatches} micro-batches: bubble {bubble_fraction(p.pp, p.microbatches, p.stages_per_rank):.0%}"
        )
    if p.tp > 1:
        lines.append(
            f"tensor parallel: {m.n_head // p.tp} of {m.n_head} heads and 1/{p.tp} of each MLP per rank"
        )
    if p.dp > 1:
        lines.append(
            f"data parallel: {p.dp_mode}, {job.train.batch_size // p.dp} sequences per rank per step"
        )
    return "\n".join(lines)


def _resume_text(last: Path, job, arch: str) -> str:
    """Where a run folder resumes, and whether the checkpoint is re-sharded to this layout (or
    will be refused: another model kind or batch size)."""
    import json

    from fastserve.pipeline.training.checkpoints import STATE, mismatch, saved_layout

    p = job.parallel
    if (last / STATE).exists():
        info = json.loads((last / STATE).read_text())  # readable: latest_complete checked it
        problem = mismatch(info, {"arch": arch, "batch_size": job.train.batch_size})
        if problem:
            return f"{last.name} {problem}"
    was = saved_layout(last) or {}
    now = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "stages_per_rank": p.stages_per_rank}
    if all(was.get(k) == v for k, v in now.items()):
        return f"resumes from {last.name}"
    saved = f"saved at dp={was.get('dp')} tp={was.get('tp')} pp={was.get('pp')}"
    if not (last / STATE).exists():
        return f"resumes from {last.name}: {saved} by an earlier FastServe, refused at this layout"
    return f"resumes from {last.name}, {saved}: each rank reads its share at this layout"


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    required=True,
    help="TOML training job file.",
)
@click.option(
    "--data", multiple=True, help="Corpus Parquet file/folder/glob (overrides data.paths)."
)
@click.option("--output", help="Run folder (overrides output.path).")
@click.option("--steps", type=int, help="Overrides train.steps.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (stages, shards, memory per rank) and exit."
)
def train(config_file, data, output, steps, dry_run) -> None:
    """Train a language model with pipeline, tensor and data parallelism over MPI ranks."""
    job = load_train_job(config_file, _overrides(data, output, steps), other_tables=LAUNCH_TABLES)
    if dry_run:
        click.echo(plan_text(job))
        return
    from fastserve.pipeline.distributed.bootstrap import bootstrap, shutdown
    from fastserve.pipeline.training.trainer import Trainer

    env = bootstrap(timeout_s=job.parallel.timeout_s)
    try:
        trainer = Trainer(job, env)
        code = trainer.fit(log=lambda s: click.echo(s, err=True))
        if code == 0:
            out = trainer.export(Path(job.output.path) / "export")
            if out is not None:
                task = "sentiment" if job.model.arch == "classifier" else "generate"
                click.echo(
                    f"exported {out} (serve it: fastserve infer --task {task} --model {out} ...)",
                    err=True,
                )
    except UserError as e:
        if env.world_size == 1:
            raise
        # one rank's mistake ends every rank now (the others may be waiting on it in a
        # collective): this rank says why, then MPI ends the job with its exit code
        click.secho(f"error: {e}", err=True, fg="red")
        sys.stderr.flush()
        env.comm.Abort(e.exit_code)
    shutdown(env)
    sys.exit(code)
