"""Faults injected into real training runs, for the tests: the `fastserve` command with a hook
installed in the trainer (production code carries only the empty hook lists).

    mpiexec -n 2 python -m fastserve.pipeline.testing.faults 1:3:raise train --config job.toml

RANK:STEP:KIND, KIND one of
  raise        rank RANK raises at the start of step STEP (its traceback must end the job)
  hang         rank RANK sleeps there for an hour (the others' collective must time out)
  kill-in-save every rank is SIGKILLed right after writing its share of the checkpoint of step
               STEP, before the checkpoint is marked complete (RANK is ignored)
  usr1         rank RANK sends itself SIGUSR1 (what Slurm sends before a time limit) at the start
               of step STEP
"""

from __future__ import annotations

import os
import signal
import sys
import time


def install(spec: str) -> None:
    from fastserve.pipeline.training.trainer import HOOKS

    rank_s, step_s, kind = spec.split(":")
    rank, step = int(rank_s), int(step_s)

    def at_step(trainer, s: int) -> None:
        if trainer.env.rank == rank and s == step:
            if kind == "hang":
                time.sleep(3600)
            if kind == "usr1":
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")

    def after_saving(trainer, s: int) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("raise", "hang", "usr1"):
        HOOKS["step"].append(at_step)
    elif kind == "kill-in-save":
        HOOKS["saved_shard"].append(after_saving)
    else:
        raise SystemExit(f"unknown fault kind {kind!r}; expected raise, hang, usr1 or kill-in-save")


def main() -> None:
    install(sys.argv[1])
    sys.argv = ["fastserve", *sys.argv[2:]]
    from fastserve.jobs.cli import main as fastserve

    fastserve()


if __name__ == "__main__":
    main()
