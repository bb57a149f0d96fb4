"""Sharded training checkpoints, safetensors only; and the consolidated export.

    <run>/checkpoints/step-000050/rank-00000.safetensors   this rank's model and optimizer tensors
    <run>/checkpoints/step-000050/rank-00000.json          step, layout, scheduler state
    <run>/checkpoints/step-000050/COMPLETE                 written by rank 0 after every rank saved

A checkpoint without COMPLETE is ignored (a kill mid-save); resume takes the latest complete one,
on the same layout (dp, tp, pp) it was saved with. No pickle is written or read.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().contiguous().cpu()


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def latest_complete(run: Path) -> Path | None:
    done = sorted(p.parent for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    return done[-1] if done else None


def save_shard(
    run: Path, step: int, rank: int, named_params, optimizer, scheduler, layout: dict
) -> None:
    """This rank's share of the checkpoint at `step` (called by every rank)."""
    tensors = {}
    for name, p in named_params:
        tensors[f"model/{name}"] = _local(p)
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"optim/{key}/{name}"] = _local(state[key])
        if "step" in state:
            tensors[f"optim/step/{name}"] = _local(
                torch.as_tensor(state["step"], dtype=torch.float32)
            ).reshape(1)
    d = step_dir(run, step)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / f"rank-{rank:05d}.safetensors"))
    meta = {"step": step, "layout": layout, "scheduler": scheduler.state_dict()}
    (d / f"rank-{rank:05d}.json").write_text(json.dumps(meta, sort_keys=True, default=float))


def mark_complete(run: Path, step: int, keep: int) -> None:
    """Rank 0, after a barrier: the checkpoint is whole. Older ones beyond `keep` are removed."""
    (step_dir(run, step) / "COMPLETE").write_text(f"{step}\n")
    done = sorted(p.parent for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    for old in done[:-keep] if keep > 0 else []:
        (old / "COMPLETE").unlink()  # first: a half-removed checkpoint is never taken as whole
        try:
            shutil.rmtree(old)
        except OSError as e:  # training goes on; the folder is only space, no longer a checkpoint
            print(f"fastserve: could not remove old checkpoint {old}: {e}", file=sys.stderr)


def load_shard(d: Path, rank: int, named_params, optimizer, scheduler, layout: dict) -> int:
    """Restore this rank's tensors from checkpoint folder `d`; return the step to resume after."""
    meta = json.loads((d / f"rank-{rank:05d}.json").read_text())
    if meta["layout"] != layout:
        raise ConfigError(
            f"checkpoint {d} was saved with layout {meta['layout']}, this run is {layout}; "
            "resume with the same parallel settings, or start a new output folder"
        )
    tensors = load_file(str(d / f"rank-{rank:05d}.safetensors"))
    with torch.no_grad():
        for name, p in named_params:
            _target(p).copy_(tensors[f"model/{name}"])
            if f"optim/exp_avg/{name}" in tensors:
                state = optimizer.state[p]
                state["step"] = torch.tensor(float(tensors[f"optim/step/{name}"][0]))
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p)
                    _target(state[key]).copy_(tensors[f"optim/{key}/{name}"])
    saved = meta["scheduler"]
    groups = len(optimizer.param_groups)
    if len(saved.get("base_lrs", [])) != groups:  # saved with one group (before decay groups)
        saved = {**saved, "base_lrs": saved["base_lrs"][:1] * groups,
                 "_last_lr": saved["_last_lr"][:1] * groups}  # fmt: skip
    scheduler.load_state_dict(saved)
    # The scheduler's state says where it was; the optimizer must be told the rate it had set.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    return int(meta["step"])


def _target(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
