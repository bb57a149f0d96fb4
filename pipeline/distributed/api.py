"""The Python API: a model and a strategy in, a trained model out, over the same machinery as
`fastserve train` (run the script under `mpiexec -n N`).

    from fastserve.pipeline.distributed.api import DistributedModel
    from fastserve.pipeline.models.gpt import GPT, GPTConfig

    dm = DistributedModel(GPT(GPTConfig(vocab_size=512)), strategy="pipeline")   # pp = world size
    history = dm.fit("corpus/", steps=100, batch_size=16, seq_len=64, output="runs/api")
    print(dm.predict(["the movie was"], max_new_tokens=20))

Strategies: "data_parallel" (dp = world), "pipeline" (pp = world), "tensor" (tp = world), or a
ParallelDims for a mix. The model's own config (vocab size included) is used as it is; the corpus
is tokenized with a BPE of that vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path

from .parallel_dims import ParallelDims

STRATEGIES = ("data_parallel", "pipeline", "tensor")


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
        return ParallelDims(
            dp=world if self.strategy == "data_parallel" else 1,
            tp=world if self.strategy == "tensor" else 1,
            pp=world if self.strategy == "pipeline" else 1,
        )

    def fit(
        self,
        data,
        steps: int,
        batch_size: int,
        seq_len: int,
        output: str,
        lr: float = 3e-4,
        seed: int = 0,
        **train,
    ) -> list[dict]:
        """Train for `steps`; return the metrics of every step (as metrics.jsonl holds them)."""
        from ..training.config import (
            ParallelConfig,
            TrainDataConfig,
            TrainJob,
            TrainLoopConfig,
            TrainModelConfig,
            TrainOutputConfig,
            check,
        )
        from ..training.trainer import Trainer
        from .bootstrap import bootstrap

        self.env = self.env or bootstrap()
        dims = self._dims(self.env.world_size)
        cfg = self.model.config
        job = TrainJob(
            model=TrainModelConfig(
                arch=self.model.arch,
                n_layer=cfg.n_layer,
                n_head=getattr(cfg, "n_head", 1),
                n_embd=cfg.n_embd,
                block_size=cfg.block_size,
                dropout=cfg.dropout,
            ),
            data=TrainDataConfig(
                paths=tuple([data] if isinstance(data, str) else data),
                vocab_size=cfg.vocab_size,
                seq_len=seq_len,
            ),
            train=TrainLoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **train),
            parallel=ParallelConfig(
                dp=dims.dp,
                tp=dims.tp,
                pp=dims.pp,
                schedule=self.schedule,
                microbatches=self.microbatches,
            ),
            output=TrainOutputConfig(path=output),
        )
        check(job, "DistributedModel.fit")
        self.trainer = Trainer(job, self.env, model=self.model)
        self.trainer.fit(log=lambda s: None)
        lines = (
            (Path(output) / "metrics.jsonl").read_text().splitlines() if self.env.rank == 0 else []
        )
        return self.env.comm.bcast([json.loads(x) for x in lines], root=0)

    def predict(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of `prompts`, from the trained model (every rank gets them)."""
        from ..config import ModelConfig, TaskConfig
        from ..tasks.generate import GenerateTask

        if self.trainer is None:
            raise RuntimeError("call fit() before predict()")
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


__all__ = ["DistributedModel", "ParallelDims"]
