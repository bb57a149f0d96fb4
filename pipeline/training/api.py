"""The Python API: a model and a strategy in, a trained model out, over the same machinery as
`fastserve train` (run the script under `mpiexec -n N`; every rank runs the same lines).

    from fastserve.pipeline.training.api import DistributedModel
    from fastserve.pipeline.models.lstm import LSTMConfig, LSTMLM

    # in-memory arrays, as Keras takes them: token ids and the next word of each row
    dm = DistributedModel(LSTMLM(LSTMConfig(vocab_size=50, n_layer=2)), strategy="multi_gpu")
    dm.fit(padded_sequences, labels, epochs=5, batch_size=32)
    predictions = dm.predict(test_sequences)      # (rows, vocab) next-word probabilities
    print(np.argmax(predictions[0]), dm.evaluate(test_sequences, test_labels))

    # or a Parquet corpus, tokenized with a BPE of the model's vocabulary size
    dm.fit("corpus/", steps=100, batch_size=16, seq_len=64, output="runs/api")
    print(dm.generate(["the movie was"], max_new_tokens=20))

Strategies: "data_parallel" (or "multi_gpu": dp = world), "pipeline" (pp = world), "tensor"
(tp = world), "auto" (data parallel while the model, its gradients and AdamW's moments fit one
device, else pipeline), or a ParallelDims for a mix. predict and evaluate run through the same
stages and shards as training: no rank ever holds the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..distributed.parallel_dims import ParallelDims

STRATEGIES = ("data_parallel", "multi_gpu", "pipeline", "tensor", "auto")


class DistributedModel:
    def __init__(
        self,
        model,
        strategy: str | ParallelDims = "data_parallel",
        schedule: str = "1F1B",
        microbatches: int = 2,
    ):
        self.model, self.strategy, self.schedule, self.microbatches = (
            model,
            strategy,
            schedule,
            microbatches,
        )
        self.model_cls = type(model)  # before training wraps it
        self.trainer = None
        self.env = None

    def _dims(self, world: int) -> ParallelDims:
        if isinstance(self.strategy, ParallelDims):
            return self.strategy
        if self.strategy not in STRATEGIES:
            from ..errors import ConfigError

            raise ConfigError(
                f"strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)} or a ParallelDims"
            )
        strategy = auto_strategy(self.model, world) if self.strategy == "auto" else self.strategy
        dp = world if strategy in ("data_parallel", "multi_gpu") else 1
        return ParallelDims(
            dp=dp,
            tp=world if strategy == "tensor" else 1,
            pp=world if strategy == "pipeline" else 1,
        )

    def fit(
        self,
        x=None,
        y=None,
        epochs: int = 1,
        batch_size: int = 32,
        validation_split: float = 0.0,
        *,
        steps: int | None = None,
        seq_len: int | None = None,
        output: str | None = None,
        lr: float = 3e-4,
        seed: int = 0,
        **train,
    ) -> list[dict]:
        """Train; return the metrics of every step (as metrics.jsonl holds them).

        `x` token ids (rows, length) as a NumPy array, tensor or list of lists, with `y` the next
        token of each row (or none: x is then a language-modelling corpus), for `epochs` passes
        over the rows; or `x` a Parquet corpus path with `steps` and `seq_len`."""
        import math

        from ..distributed.bootstrap import bootstrap
        from .config import (
            ParallelConfig,
            TrainDataConfig,
            TrainJob,
            TrainLoopConfig,
            TrainModelConfig,
            TrainOutputConfig,
            check,
        )
        from .trainer import Trainer

        self.env = self.env or bootstrap()
        dims = self._dims(self.env.world_size)
        cfg = self.model.config
        arrays = None
        if isinstance(x, (str, Path)) or (
            isinstance(x, (list, tuple)) and x and isinstance(x[0], str)
        ):
            paths = tuple([str(x)] if isinstance(x, (str, Path)) else x)
            if steps is None or seq_len is None:
                raise TypeError("fit(corpus, ...) takes steps= and seq_len= as well")
        else:
            from ..registry import ARCHS
            from .instructions import ArrayData

            # an LSTM reads rows of any length; a transformer's positions end at block_size
            limit = cfg.block_size if ARCHS[self.model.arch].attention else None
            arrays = ArrayData(
                x, y, validation_split, seed, vocab_size=cfg.vocab_size, block_size=limit
            )
            paths, seq_len = ("<in-memory arrays>",), arrays.ids.shape[1] - 1
            steps = steps or epochs * math.ceil(len(arrays.train) / batch_size)
            train.setdefault("eval_every", 0)
        if self.trainer is not None and output is not None:
            before = Path(self.trainer.job.output.path).resolve()
            if Path(output).resolve() == before:
                raise ValueError(
                    f"output={str(output)!r} holds the run of the previous fit(), finished: a "
                    "fit there would resume it and train nothing; give another output= (or "
                    "none: a temporary folder)"
                )
        # checked above, before anything changes: a refused fit leaves the trained model as it was
        if self.trainer is not None:  # fit again: on from the trained weights (a new optimizer)
            state = self.trainer.full_state(everyone=True)
            self.model = self.model_cls(self.model.config)
            self.model.load_state_dict(state, strict=True)
            self.trainer = None
            cfg = self.model.config
        if output is None:
            import tempfile

            output = self.env.comm.bcast(
                tempfile.mkdtemp(prefix="fastserve-api-") if self.env.rank == 0 else None
            )
        Path(output).mkdir(parents=True, exist_ok=True)
        job = TrainJob(
            model=TrainModelConfig(
                arch=self.model.arch,
                n_layer=cfg.n_layer,
                n_head=getattr(cfg, "n_head", 1),
                n_embd=cfg.n_embd,
                block_size=max(cfg.block_size, seq_len),
                dropout=cfg.dropout,
            ),
            data=TrainDataConfig(
                paths=paths,
                vocab_size=cfg.vocab_size,
                seq_len=seq_len,
                val_fraction=validation_split or 0.1,
                # arrays are token ids already: no tokenizer is trained for them
                tokenizer="<token ids given>" if arrays is not None else None,
            ),
            train=TrainLoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **train),
            parallel=ParallelConfig(
                dp=dims.dp,
                tp=dims.tp,
                pp=dims.pp,
                schedule=self.schedule,
                microbatches=self.microbatches,
            ),
            output=TrainOutputConfig(path=str(output)),
        )
        check(job, "DistributedModel.fit")
        self.trainer = Trainer(job, self.env, model=self.model, data=arrays)
        self.trainer.fit(log=lambda s: None)
        lines = (
            (Path(output) / "metrics.jsonl").read_text().splitlines() if self.env.rank == 0 else []
        )
        return self.env.comm.bcast([json.loads(x) for x in lines], root=0)

    def _logits(self, x):
        """The model's outputs for token ids `x` (rows, length), through the trained stages and
        shards, on every rank: (rows, length, vocab) for a language model, (rows, labels) for a
        classifier."""
        import torch

        t = self.trainer
        if t is None:
            raise RuntimeError("call fit() before predict() or evaluate()")
        x = torch.as_tensor(self._rows(x))
        rows = len(x)
        chunk = t.job.parallel.microbatches if t.dims.pp > 1 else 1
        if rows % chunk:  # the pipeline splits the batch into equal micro-batches
            x = torch.cat([x, x[-1:].expand(chunk - rows % chunk, -1)])
        for c in t.chunks:
            c.eval()
        with torch.no_grad(), t._autocast():
            x = x.to(t.env.device)
            if t.schedule is None:
                out = t.model(x)
            else:
                # the last stage computes a loss: against targets that count nothing
                dummy = torch.full(x.shape, -100, dtype=torch.long, device=x.device)
                schedule = t.schedule_for(tuple(x.shape))
                if t.is_first and t.is_last:
                    out = schedule.eval(x, target=dummy, losses=[])
                elif t.is_first:
                    out = schedule.eval(x)
                elif t.is_last:
                    out = schedule.eval(target=dummy, losses=[])
                else:
                    out = schedule.eval()
        for c in t.chunks:
            c.train()
        mine = out.float().cpu().numpy()[:rows] if t.is_last and out is not None else None
        source = t.is_last and t.dp_rank == 0 and t.tp_rank == 0
        gathered = self.env.comm.allgather(mine if source else None)
        return next(g for g in gathered if g is not None)

    def _rows(self, x, y=None):
        """Rows of token ids (and labels) the trained model can read, as int64 arrays; else an
        ArrayError (a ValueError) saying what is wrong, raised on every rank alike before any
        rank starts a collective (a pipeline would otherwise wait on the failed rank)."""
        from ..registry import ARCHS
        from .instructions import model_inputs

        cfg = self.model.config
        limit = cfg.block_size if ARCHS[self.model.arch].attention else None
        return model_inputs(x, y, vocab_size=cfg.vocab_size, block_size=limit)

    def predict(self, x, **kwargs):
        """Probabilities per row: over the next token after each row (language model; the
        distribution at the row's last position) or over the labels (classifier). Rows of token
        ids, as fit took them; every rank gets the same (rows, vocab or labels) array. (A list of
        texts is generated from instead, as generate() does: the earlier API.)"""
        import numpy as np

        if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):  # texts: generate
            return self.generate(list(x), **kwargs)
        logits = self._logits(x)
        last = logits[:, -1] if logits.ndim == 3 else logits
        e = np.exp(last - last.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def evaluate(self, x, y=None) -> dict:
        """{loss, accuracy, rows_per_s} of predicting `y` (the next token, or the label) from
        each row of `x`; without `y`, {loss, perplexity, rows_per_s} of `x` as a corpus."""
        import math
        import time

        import numpy as np

        if y is not None:
            x, y = self._rows(x, y)
        t0 = time.perf_counter()
        logits = self._logits(x)
        seconds = time.perf_counter() - t0
        logp = logits - logits.max(axis=-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
        rows = len(logits)
        if y is not None:
            y = np.asarray(y, dtype=np.int64).reshape(-1)
            last = logp[:, -1] if logp.ndim == 3 else logp
            loss = float(-last[np.arange(rows), y].mean())
            acc = float((last.argmax(-1) == y).mean())
            return {"loss": loss, "accuracy": acc, "rows_per_s": rows / seconds}
        ids = np.asarray(x, dtype=np.int64)
        target, keep = ids[:, 1:], ids[:, 1:] != 0
        picked = np.take_along_axis(logp[:, :-1], target[..., None], axis=-1)[..., 0]
        loss = float(-(picked * keep).sum() / max(1, keep.sum()))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "rows_per_s": rows / seconds}

    def generate(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of `prompts` (texts), from the model trained on a corpus (its
        export; every rank gets them)."""
        from ..config import ModelConfig, TaskConfig
        from ..tasks.generate import GenerateTask

        if self.trainer is None or self.trainer.tokenizer_json is None:
            raise RuntimeError("generate() needs a model fitted on a corpus (it has the tokenizer)")
        folder = Path(self.trainer.job.output.path) / "export"
        self.trainer.export(folder)
        out = None
        if self.env.rank == 0:
            task = GenerateTask(
                ModelConfig(path=str(folder)),
                TaskConfig(name="generate", max_new_tokens=max_new_tokens),
            )
            out = task.process(prompts, [str(i) for i in range(len(prompts))], {}).columns[
                "generated"
            ]
        return self.env.comm.bcast(out, root=0)


def auto_strategy(model, world: int) -> str:
    """data_parallel while the model, its gradients and AdamW's two moments (16 bytes a
    parameter in fp32) take at most half of one device's memory; pipeline otherwise."""
    import torch

    need = 16 * sum(p.numel() for p in model.parameters())
    if torch.cuda.is_available():
        have = torch.cuda.get_device_properties(0).total_memory
    else:
        import psutil

        have = psutil.virtual_memory().total // max(1, world)
    return "data_parallel" if need <= have // 2 else "pipeline"


__all__ = ["DistributedModel", "ParallelDims", "auto_strategy"]
