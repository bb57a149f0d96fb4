"""The training loop: one function per concern, run on every rank.

    mpiexec -n 4 fastserve train --config train.toml        # e.g. pp=2 x dp=2
    fastserve train --config train.toml                      # one process

Every rank builds the full model from the seed, keeps its pipeline stage(s), applies tensor and
data parallelism (pipeline/distributed/parallelize.py), and steps together. Only the last stage
sees the loss; rank 0 writes metrics.jsonl and the console summary. SIGTERM / SIGUSR1 (what
Slurm sends before a time limit or preemption) make every rank save a checkpoint at the end of the
step and exit with REQUEUE_EXIT_CODE, asking to be requeued; rerunning resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..distributed.bootstrap import DistEnv
from ..distributed.parallel_dims import ParallelDims
from ..distributed.parallelize import clip_grad_norm, parallelize, stage_layers
from ..errors import ConfigError
from . import checkpoints as ckpt
from .config import TrainJob
from .data import LabeledData, PackedData
from .model_factory import build_model, flops_per_token
from .optim import build_optimizer, build_scheduler
from .prepare import build_token_cache, cache_files

# Extension points for tests (fastserve.pipeline.testing.faults): callables (trainer, step) run
# at the start of each step, and after this rank wrote its share of a checkpoint (before the
# checkpoint is marked complete). Empty in production.
HOOKS: dict[str, list] = {"step": [], "saved_shard": []}

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again": the job script requeues on it


def bubble_fraction(pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Idle share of a pipeline step in the simple model (p-1)/(v*m + p-1)."""
    return 0.0 if pp == 1 else (pp - 1) / (stages_per_rank * microbatches + pp - 1)


def measured_peak_flops(device) -> float:
    """A matmul's FLOP/s on this device with this process's threads: the MFU denominator."""
    n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class Trainer:
    def __init__(
        self, job: TrainJob, env: DistEnv, model: torch.nn.Module | None = None, data=None
    ):
        """`model`: an already built GPT or LSTMLM to train (its config must match job.model);
        by default the model is built from job.model and the seed. `data`: in-memory examples
        (instructions.ArrayData, from the Python API) instead of job.data's corpus."""
        self.job, self.env, self.given = job, env, model
        # its class before parallelism wraps it (fully_shard swaps in a class of its own)
        self.given_cls = type(model) if model is not None else None
        self.arrays = data
        # targets masked with -100 (instruction data, arrays): the loss is summed and scaled
        self.instruct = data is not None or bool(job.data.prompt_column or job.data.messages_column)
        self.loss_scale = 1.0  # instruction data: see _scale_for
        self.init_from = job.model.init_from
        self.hf_cfg = None
        if self.init_from:
            from ..models.hf_format import config_from_hf

            self.arch, self.hf_cfg = config_from_hf(self.init_from)
            c = self.hf_cfg  # the [model] table's sizes, as the folder says them
            self.job = job = replace(job, model=replace(
                job.model, arch=self.arch, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                block_size=c.block_size))  # fmt: skip
            tp = job.parallel.tp
            for what, n in (
                ("attention heads", c.n_head),
                ("key/value heads", getattr(c, "n_kv_head", c.n_head)),
            ):
                if n % tp:
                    raise ConfigError(
                        f"{self.init_from} has {n} {what}: parallel.tp = {tp} must divide them"
                    )
            from ..models.hf_format import read_hf_config

            window = read_hf_config(self.init_from).get("sliding_window")
            if window and job.data.seq_len > window:
                raise ConfigError(
                    f"data.seq_len ({job.data.seq_len}) is longer than {self.init_from}'s sliding "
                    f"window ({window}), which FastServe does not apply; use seq_len <= {window}"
                )
            if job.data.seq_len > self.hf_cfg.block_size:
                raise ConfigError(
                    f"data.seq_len ({job.data.seq_len}) is longer than {self.init_from} serves "
                    f"({self.hf_cfg.block_size} positions)"
                )
        p = job.parallel
        self.dims = ParallelDims(p.dp, p.tp, p.pp)
        self.dims.validate(env.world_size)
        self.run = Path(job.output.path)
        self.stop_requested = 0
        self.counting: list[int] | None = None  # [correct, total] while evaluating a classifier
        self._prepare_data()
        self._build()

    # -- data: rank 0 tokenizes, the others read its result ------------------------------------

    def _prepare_data(self) -> None:
        import numpy as np

        if self.arrays is not None:  # every rank holds them: nothing to tokenize or share
            self.data, self.labels, self.tokenizer_json = self.arrays, None, None
            self.vocab_size = self.given.config.vocab_size
            return

        d, run = self.job.data, self.run
        tok_json, tokens_file, labels_file = cache_files(run)
        classifier = self.job.model.arch == "classifier"
        failure = None
        if self.env.rank == 0:
            try:
                build_token_cache(self.job, run, self.init_from, self.instruct)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it (below)
                failure = e
        # Rank 0's failure (an empty corpus, a text column of integers) ends every rank: the
        # others would otherwise wait here for good, holding the allocation. Rank 0 says why, once.
        code = self.env.comm.bcast(
            None if failure is None else getattr(failure, "exit_code", 1), root=0
        )
        if failure is not None:
            raise failure
        if code is not None:
            raise SystemExit(code)
        from tokenizers import Tokenizer

        self.tokenizer_json = tok_json
        tok = Tokenizer.from_file(str(tok_json))
        self.vocab_size = self.hf_cfg.vocab_size if self.hf_cfg else tok.get_vocab_size()
        tokens = np.load(tokens_file, allow_pickle=False)
        self.labels = json.loads(labels_file.read_text()) if classifier else None
        if self.instruct:
            from .instructions import InstructionData

            mask = np.load(run / "data" / "mask.npy", allow_pickle=False)
            self.data = InstructionData(tokens, mask, d.val_fraction, self.job.train.seed)
            rejected = json.loads((run / "data" / "rejected.json").read_text())
            if self.env.rank == 0:
                print(
                    f"instruction data: {len(tokens)} examples"
                    + (f", set aside {rejected}" if rejected else ""),
                    file=sys.stderr,
                )
        elif classifier:
            label_ids = np.load(run / "data" / "label_ids.npy", allow_pickle=False)
            self.data = LabeledData(tokens, label_ids, d.val_fraction, self.job.train.seed)
        else:
            self.data = PackedData(tokens, d.seq_len, d.val_fraction, self.job.train.seed)

    # -- model, parallelism, optimizer ----------------------------------------------------------

    def _build(self) -> None:
        job, env, dims = self.job, self.env, self.dims
        p = job.parallel
        if self.init_from:
            from ..models.hf_format import build_from_hf

            # nothing allocated for the whole model: each stage materializes its own part
            _, _, self.full = build_from_hf(self.init_from, device="meta")
        else:
            self.full = (
                self.given
                if self.given is not None
                else build_model(job.model, self.vocab_size, job.train.seed, self.labels)
            )
        load = None
        if self.init_from:
            from ..models.hf_format import materialize

            def load(chunk):
                materialize(chunk, self.init_from, env.device)

        parts = parallelize(
            self.full, dims, dims.build_mesh(env.device.type), p, env.device, load_weights=load
        )
        self.parts = parts
        self.pp_rank, self.dp_rank, self.tp_rank = (parts.coords[d] for d in ("pp", "dp", "tp"))
        self.pp_group, self.n_stages, self.stage_ids = (
            parts.pp_group,
            parts.n_stages,
            parts.stage_ids,
        )
        self.chunks = parts.chunks  # unwrapped: their parameter names are the whole model's
        self.runnable = parts.runnable
        self.is_first, self.is_last = parts.is_first, parts.is_last
        self.tie_group, self.tied_copy = self._tie_over_stages()
        self.named = [
            ("wte.weight" if q is self.tied_copy else n, q)  # one weight, one name
            for c in self.chunks
            for n, q in c.named_parameters()
        ]
        self.params = [q for _, q in self.named]
        t = job.train
        self.optimizer = build_optimizer(self.named, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        # a pipeline's loss per micro-batch is its share of the batch's: they sum to the mean
        self.mb = p.microbatches if p.pp > 1 else 1
        self.schedule = self.new_schedule() if p.pp > 1 else None
        self.eval_schedules: dict = {}  # the API's predict: one per input shape (see schedule_for)
        self.model = self.runnable[0]
        self.layout = {
            "dp": p.dp,
            "tp": p.tp,
            "pp": p.pp,
            "stages_per_rank": p.stages_per_rank,
            "arch": job.model.arch,
        }

    def _tie_over_stages(self):
        """A head tied to the embedding, split over pipeline stages: the first stage holds `wte`,
        the last `lm_head`, as two copies of one weight (equal at the start). After each step's
        backward both receive the sum of their gradients (Megatron's embedding group), so they
        stay equal; both are named wte.weight (checkpoints and export see one weight). Returns
        (the process group of this rank's first and last stage, the last stage's copy), or Nones."""
        import torch.distributed as dist

        cfg = getattr(self.full, "config", None)
        if self.dims.pp == 1 or not getattr(cfg, "tie_word_embeddings", False):
            return None, None
        ranks = self.parts.mesh.mesh  # (pp, dp, tp) -> global rank
        group = None
        for d in range(self.dims.dp):  # every rank creates every group, in the same order
            for t in range(self.dims.tp):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                g = dist.new_group(pair)
                if self.env.rank in pair:
                    group = g
        if group is None:  # a middle stage
            return None, None
        self.tied_mine = next(
            c.wte.weight if getattr(c, "wte", None) is not None else c.lm_head.weight
            for c in self.chunks
            if getattr(c, "wte", None) is not None or getattr(c, "lm_head", None) is not None
        )  # this rank's copy: the embedding on the first stage, the head on the last
        return group, self.tied_mine if self.is_last else None

    def _sum_tied_gradient(self) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        g = self.tied_mine.grad
        dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=self.tie_group)

    def new_schedule(self):
        """A pipeline schedule over this rank's stages. Its stages learn the tensor shapes of
        their first step and keep them: a batch of another shape needs a schedule of its own."""
        from torch.distributed import pipelining as pl

        p = self.job.parallel
        stages = [
            pl.PipelineStage(m, s, self.n_stages, self.env.device, group=self.pp_group)
            for m, s in zip(self.runnable, self.stage_ids, strict=True)
        ]
        cls = {
            "GPipe": pl.ScheduleGPipe,
            "1F1B": pl.Schedule1F1B,
            "Interleaved1F1B": pl.ScheduleInterleaved1F1B,
        }[p.schedule]
        return cls(
            stages if p.schedule == "Interleaved1F1B" else stages[0],
            n_microbatches=p.microbatches,
            loss_fn=self._loss,
            # _loss divides by the micro-batches itself: the schedule's own scaling divides
            # the whole .grad, which holds the earlier passes of gradient accumulation too
            scale_grads=False,
        )

    def schedule_for(self, shape: tuple):
        """The evaluation schedule for inputs of `shape` (every rank asks for the same)."""
        if shape not in self.eval_schedules:
            self.eval_schedules[shape] = self.new_schedule()
        return self.eval_schedules[shape]

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 2:  # classifier: (B, labels) against (B,)
            if self.counting is not None:
                self.counting[0] += int((logits.argmax(-1) == targets).sum())
                self.counting[1] += len(targets)
            return F.cross_entropy(logits.float(), targets) / self.mb
        if self.instruct:  # response tokens only: summed, scaled to the step's token mean
            ce = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            return ce * self.loss_scale
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) / self.mb

    def _scale_for(self, tokens: int, passes: int = 1) -> float:
        """Each micro-batch's summed loss times this is the mean over the `tokens` response
        tokens of the whole step, after what the layout does to gradients: data parallelism
        averages its ranks, and train_step its passes (micro-batches are summed)."""
        return self.dims.dp * passes / max(1, tokens)

    def _autocast(self):
        prec = self.job.train.precision
        on = prec == "bf16" or (prec == "auto" and self.env.device.type == "cuda")
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=on)

    # -- one step -------------------------------------------------------------------------------

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of this rank's share of the batch (0 on stages without the loss); gradients
        accumulate into .grad."""
        x, y = x.to(self.env.device), y.to(self.env.device)
        if self.schedule is None:
            with self._autocast():
                loss = self._loss(self.model(x), y)
            loss.backward()
            return loss.detach()
        losses: list[torch.Tensor] = []
        with self._autocast():
            if self.is_first and self.is_last:
                self.schedule.step(x, target=y, losses=losses)
            elif self.is_first:
                self.schedule.step(x)
            elif self.is_last:
                self.schedule.step(target=y, losses=losses)
            else:
                self.schedule.step()
        return (
            torch.stack(losses).sum().detach()  # each is its micro-batch's share (see _loss)
            if losses
            else torch.zeros((), device=self.env.device)
        )

    def _global_loss(self, loss: torch.Tensor) -> float:
        """Mean loss over the data-parallel ranks, as every rank sees it (from the last stage)."""
        import torch.distributed as dist

        if self.env.world_size == 1:
            return float(loss)
        t = loss.detach().float().reshape(1).to(self.env.device) * (1.0 if self.is_last else 0.0)
        dist.all_reduce(t)
        return float(t) / (self.dims.dp * self.dims.tp)

    def train_step(self, step: int) -> dict:
        t = self.job.train
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.env.device)
        if self.instruct:
            per = t.batch_size // t.grad_accum
            tokens = sum(
                self.data.valid(self.data.indices(step * t.grad_accum + k, per))
                for k in range(t.grad_accum)
            )
            self.loss_scale = self._scale_for(tokens, t.grad_accum)
        for k in range(t.grad_accum):
            x, y = self.data.batch(
                step * t.grad_accum + k, t.batch_size // t.grad_accum, self.dp_rank, self.dims.dp
            )
            total += self._forward_backward(x, y)
        if t.grad_accum > 1:  # the mean over the accumulated passes
            for q in self.params:
                if q.grad is not None:
                    q.grad.mul_(1.0 / t.grad_accum)
        if self.tie_group is not None:  # the tied weight's two copies: the same summed gradient
            self._sum_tied_gradient()
        norm = clip_grad_norm(
            self.params, t.grad_clip, self.pp_group,
            uncounted={id(self.tied_copy)} if self.tied_copy is not None else set(),
        )  # fmt: skip
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": self._global_loss(total / t.grad_accum), "grad_norm": float(norm)}

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.job.train
        losses = []
        self.counting = [0, 0]
        batches = self.data.val_batches(t.batch_size, t.eval_batches, self.dp_rank, self.dims.dp)
        for k, (x, y) in enumerate(batches):
            if self.instruct:
                self.loss_scale = self._scale_for(
                    self.data.valid(self.data.val_indices(k, t.batch_size))
                )
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self._autocast():
                if self.schedule is None:
                    loss = self._loss(self.model(x), y)
                else:
                    out: list[torch.Tensor] = []
                    if self.is_first and self.is_last:
                        self.schedule.eval(x, target=y, losses=out)
                    elif self.is_first:
                        self.schedule.eval(x)
                    elif self.is_last:
                        self.schedule.eval(target=y, losses=out)
                    else:
                        self.schedule.eval()
                    loss = (
                        torch.stack(out).sum() if out else torch.zeros((), device=self.env.device)
                    )
            losses.append(self._global_loss(loss))
        correct, total = self.counting
        self.counting = None
        if self.job.model.arch == "classifier":
            # counted on the last stage's ranks only; TP ranks there count the same rows
            mine = (correct, total) if self.is_last else (0, 0)
            right, seen = (self.env.sum(v) for v in mine)
            self.accuracy = right / max(1, seen)
        return sum(losses) / len(losses)

    # -- checkpoints and signals ---------------------------------------------------------------

    def _checkpoint_meta(self) -> dict:
        """What a checkpoint must agree with to be resumed (the layout itself may change)."""
        return {"layout": self.layout, "arch": self.job.model.arch,
                "batch_size": self.job.train.batch_size}  # fmt: skip

    def save(self, step: int) -> None:
        ckpt.save(
            self.run, step, self.env.rank, self.named, self.optimizer, self.scheduler,
            self._checkpoint_meta(),
        )  # fmt: skip
        for hook in HOOKS["saved_shard"]:
            hook(self, step)
        self.env.comm.Barrier()
        if self.env.rank == 0:
            ckpt.mark_complete(self.run, step, self.job.checkpoint.keep)
        self.env.comm.Barrier()

    def resume(self) -> int:
        """The step to start from: after the latest complete checkpoint, or 0."""
        say = (lambda m: print(f"fastserve: {m}", file=sys.stderr)) if self.env.rank == 0 else None
        d = ckpt.latest_complete(self.run, warn=say)
        if d is None:
            return 0
        self.resumed_layout = ckpt.saved_layout(d)
        return ckpt.load(
            d, self.env.rank, self.named, self.optimizer, self.scheduler, self._checkpoint_meta()
        )

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_requested = signum

        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, handler)

    def _should_stop(self) -> bool:
        return bool(self.env.max(self.stop_requested))

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, log=print) -> int:
        """Train to `train.steps`; return the process exit code (0, or REQUEUE_EXIT_CODE)."""
        job, t = self.job, self.job.train
        self.install_signal_handlers()
        start = self.resume()
        metrics_path = self.run / "metrics.jsonl"
        if self.env.rank == 0:
            trim_metrics(metrics_path, start)
            self._record_run(start)
        tokens_per_step = t.batch_size * job.data.seq_len
        fpt = flops_per_token(self.full, job.model, job.data.seq_len)
        peak = t.peak_tflops * 1e12 if t.peak_tflops > 0 else measured_peak_flops(self.env.device)
        bubble = bubble_fraction(
            self.dims.pp, job.parallel.microbatches, job.parallel.stages_per_rank
        )
        if self.env.rank == 0:
            log(self.describe(start))
        for step in range(start, t.steps):
            for hook in HOOKS["step"]:
                hook(self, step)
            t0 = time.perf_counter()
            m = self.train_step(step)
            dt = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": m["loss"],
                "grad_norm": m["grad_norm"],
                "lr": self.scheduler.get_last_lr()[0],
                "step_time_s": dt,
                "tokens_per_s": tokens_per_step / dt,
                "bubble_fraction": bubble,
                "mfu": fpt * tokens_per_step / dt / (peak * self.env.world_size),
            }
            last = step + 1 == t.steps
            if len(self.data.val) and ((t.eval_every and (step + 1) % t.eval_every == 0) or last):
                val = self.evaluate()
                record.update(val_loss=val, val_perplexity=math.exp(min(val, 50)))
                if self.job.model.arch == "classifier":
                    record.update(val_accuracy=self.accuracy)
                    del record["val_perplexity"]
            if self.env.rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log(self.progress_line(record))
            every = job.checkpoint.every
            stop = not last and self._should_stop()  # a signal: save and leave, whatever step
            if stop or last or (every and (step + 1) % every == 0):
                self.save(step + 1)
            if stop:
                if self.env.rank == 0:
                    log(
                        f"signal {self.stop_requested or ''}: checkpoint at step {step + 1} saved; exit {REQUEUE_EXIT_CODE} to be requeued"
                    )
                return REQUEUE_EXIT_CODE
        return 0

    def _record_run(self, start: int) -> None:
        """One line per start in runs.jsonl (what `fastserve status` shows: the target, where
        this start resumed from, the Slurm job)."""
        import socket

        from ..slurm_env import SlurmEnv

        entry = {
            "started": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "steps": self.job.train.steps,
            "from_step": start,
            "world_size": self.env.world_size,
            "layout": asdict(self.job.parallel),
            "slurm_job_id": SlurmEnv.read().job_id,
        }
        with open(self.run / "runs.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def describe(self, start: int) -> str:
        p, m = self.job.parallel, self.job.model
        n = self.full.num_params(non_embedding=False)
        stages = stage_layers(m.n_layer, self.n_stages)
        lines = [
            f"model {m.arch}: {n / 1e6:.2f}M parameters ({self.full.num_params() / 1e6:.2f}M non-embedding), vocab {self.vocab_size}",
            f"layout dp={p.dp} tp={p.tp} pp={p.pp}"
            + (
                f" ({p.schedule}, {p.microbatches} micro-batches, stages {stages})"
                if p.pp > 1
                else ""
            ),
            f"steps {start} -> {self.job.train.steps}" + (" (resumed)" if start else ""),
        ]
        was = getattr(self, "resumed_layout", None)
        if start and was and was != self.layout:
            lines.append(
                f"resumed at a new layout: saved at dp={was.get('dp')} tp={was.get('tp')} "
                f"pp={was.get('pp')}, each rank read its own stages and shards of it"
            )
        return "\n".join(lines)

    @staticmethod
    def progress_line(r: dict) -> str:
        val = ""
        if "val_accuracy" in r:
            val = f"  val {r['val_loss']:.4f} accuracy {r['val_accuracy']:.1%}"
        elif "val_loss" in r:
            val = f"  val {r['val_loss']:.4f} ppl {r['val_perplexity']:.1f}"
        return f"step {r['step']:>5}  loss {r['loss']:.4f}  {r['tokens_per_s']:.0f} tok/s  mfu {r['mfu']:.1%}{val}"

    # -- export (training/export.py) -----------------------------------------------------------

    def full_state(self, everyone: bool = False) -> dict | None:
        from .export import full_state

        return full_state(self, everyone)

    def export(self, folder: Path) -> Path | None:
        from .export import export

        return export(self, folder)


def trim_metrics(path: Path, start: int) -> None:
    """Before a run goes on from the checkpoint of step `start`, forget the steps after it that an
    interrupted run had logged (a node lost after step 75, the last checkpoint at 70: steps 71-75
    are done again and must be logged once). Atomic: a kill leaves the old file or the new one."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= start:
                kept.append(line if line.endswith("\n") else line + "\n")  # appends follow
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if kept != lines:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
