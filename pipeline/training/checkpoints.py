"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), in safetensors; and
resuming at another layout.

    <run>/checkpoints/step-000050/shard-00001-model-00001-of-00001.safetensors   rank 0's share
    <run>/checkpoints/step-000050/shard-00002-model-00001-of-00001.safetensors   rank 1's share …
    <run>/checkpoints/step-000050/state.json     step, layout, batch size, scheduler (rank 0)
    <run>/checkpoints/step-000050/COMPLETE       written by rank 0 after every rank saved

Every rank writes the tensors it holds (`model/<name>`, `optim/exp_avg/<name>`, …) with their
place in the whole tensor (DCP's sharding offsets, in each file's safetensors header);
replicated tensors are written once. A run resumes at any layout (dp, tp, pp, stages per rank,
FSDP or DDP): each rank asks DCP for its own stages and shards, and reads only those slices.
The data position is the step (batches are a pure function of seed and step). DCP's writer and
reader for the Hugging Face format keep everything in safetensors and JSON: no pickle is
written or read (DCP's default format pickles its metadata).

A checkpoint without COMPLETE is ignored (a kill mid-save); resume takes the latest complete
one. Folders written before DCP (rank-00000.safetensors + rank-00000.json per rank) still resume
at the layout they were saved with.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ConfigError

STATE = "state.json"


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def latest_complete(run: Path, warn=None) -> Path | None:
    """The newest checkpoint marked complete whose files are all there as saved; a damaged one
    (a shard file deleted or cut, state.json unreadable) is passed over for the one before,
    with `warn(message)`."""
    done = sorted(p.parent for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    for d in reversed(done):
        reason = damaged(d)
        if reason is None:
            return d
        if warn is not None:
            warn(f"checkpoint {d} is damaged ({reason}): passed over for the one before it")
    return None


def damaged(d: Path) -> str | None:
    """Why checkpoint folder `d` cannot be resumed from, or None. Checks what state.json
    recorded of the shard files (their names and sizes), not their contents."""
    if not (d / STATE).exists():
        return None if (d / "rank-00000.json").exists() else f"{STATE} is missing"
    try:
        info = json.loads((d / STATE).read_text())
        files = info.get("files", {})
        int(info["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{STATE} is unreadable"
    for name, size in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _optimizer_state(p, optimizer, create: bool) -> dict:
    """AdamW's state of parameter `p`; made (zeros) when `create` and the optimizer has not
    stepped yet, for DCP to load into."""
    state = optimizer.state[p]
    if create and "exp_avg" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def state_dict(named_params, optimizer, create: bool = False) -> dict[str, torch.Tensor]:
    """This rank's tensors by checkpoint key: parameters (DTensors keep their placements, so DCP
    knows each one's place in the whole) and the optimizer's moments and step count."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        out[f"model/{name}"] = p
        state = _optimizer_state(p, optimizer, create)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                out[f"optim/{key}/{name}"] = state[key]
    return out


def save(run: Path, step: int, rank: int, named_params, optimizer, scheduler, meta: dict) -> None:
    """Every rank: its share of the checkpoint of `step` (a collective). Rank 0 also writes
    state.json. Not complete until mark_complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    d = step_dir(run, step)
    d.mkdir(parents=True, exist_ok=True)
    dcp.save(
        state_dict(named_params, optimizer),
        storage_writer=HuggingFaceStorageWriter(str(d), save_distributed=True),
    )
    if rank == 0:  # every rank's files are written when DCP's save returns (it gathers them)
        files = {f.name: f.stat().st_size for f in sorted(d.glob("*.safetensors"))}
        info = {"format": "dcp", "step": step, **meta, "files": files,
                "scheduler": scheduler.state_dict()}  # fmt: skip
        (d / STATE).write_text(json.dumps(info, sort_keys=True, default=float))


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


def saved_layout(d: Path) -> dict | None:
    """The layout checkpoint folder `d` was saved with (None: unreadable)."""
    try:
        if (d / STATE).exists():
            return json.loads((d / STATE).read_text())["layout"]
        return json.loads((d / "rank-00000.json").read_text())["layout"]
    except (OSError, ValueError, KeyError):
        return None


def load(d: Path, rank: int, named_params, optimizer, scheduler, meta: dict) -> int:
    """Restore this rank's stages and shards from checkpoint folder `d`, whatever layout saved it;
    return the step to resume after (every rank calls it: DCP's load is a collective)."""
    if not (d / STATE).exists():
        return _load_legacy(d, rank, named_params, optimizer, scheduler, meta["layout"])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    info = json.loads((d / STATE).read_text())
    problem = mismatch(info, meta)
    if problem:
        raise ConfigError(f"checkpoint {d} {problem}")
    wanted = state_dict(named_params, optimizer, create=True)
    reader = HuggingFaceStorageReader(str(d))
    _check_same_model(d, reader.read_metadata(), wanted)
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(d)))
    _restore_scheduler(optimizer, scheduler, info["scheduler"])
    return int(info["step"])


def mismatch(info: dict, meta: dict) -> str | None:
    """What keeps a run described by `meta` from resuming a checkpoint whose state.json is
    `info` (the layout may differ; the model kind and the batch size may not)."""
    if info.get("arch") != meta.get("arch"):
        return (
            f"holds a {info.get('arch')} model, this run builds a {meta.get('arch')} model "
            "(from [model] arch, or the init_from folder's config); resume with the model it "
            "was trained as, or start a new output folder"
        )
    if info.get("batch_size") != meta.get("batch_size"):
        return (
            f"was saved with train.batch_size = {info.get('batch_size')}, this run has "
            f"{meta.get('batch_size')}: its steps and data position count batches of "
            f"{info.get('batch_size')} rows; keep train.batch_size = {info.get('batch_size')} "
            "(change grad_accum to fit memory), or start a new output folder"
        )
    return None


def _check_same_model(d: Path, saved, wanted: dict) -> None:
    """One message when the checkpoint holds another model (not DCP's own assertion)."""
    have = saved.state_dict_metadata
    problems = []
    for key, t in wanted.items():
        if not key.startswith("model/"):
            continue
        if key not in have:
            problems.append(f"{key[6:]} is not in it")
        elif tuple(have[key].size) != tuple(t.shape):
            problems.append(f"{key[6:]} is {list(have[key].size)} there, {list(t.shape)} here")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"checkpoint {d} holds another model: {'; '.join(problems[:3])}{more}; resume with "
            "the [model] it was trained with, or start a new output folder"
        )


def _restore_scheduler(optimizer, scheduler, saved: dict) -> None:
    groups = len(optimizer.param_groups)
    if len(saved.get("base_lrs", [])) != groups:  # saved with one group (before decay groups)
        saved = {**saved, "base_lrs": saved["base_lrs"][:1] * groups,
                 "_last_lr": saved["_last_lr"][:1] * groups}  # fmt: skip
    scheduler.load_state_dict(saved)
    # The scheduler's state says where it was; the optimizer must be told the rate it had set.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _load_legacy(d: Path, rank: int, named_params, optimizer, scheduler, layout: dict) -> int:
    """A checkpoint from before DCP: per-rank files, resumable at its own layout only."""
    meta = json.loads((d / f"rank-{rank:05d}.json").read_text())
    if meta["layout"] != layout:
        raise ConfigError(
            f"checkpoint {d} was saved with layout {meta['layout']} by an earlier FastServe, "
            f"whose checkpoints resume at their own layout only; this run is {layout}: resume "
            "with the same parallel settings, or start a new output folder"
        )
    tensors = load_file(str(d / f"rank-{rank:05d}.safetensors"))
    with torch.no_grad():
        for name, p in named_params:
            _local(p).copy_(tensors[f"model/{name}"])
            if f"optim/exp_avg/{name}" in tensors:
                state = optimizer.state[p]
                state["step"] = torch.tensor(float(tensors[f"optim/step/{name}"][0]))
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p)
                    _local(state[key]).copy_(tensors[f"optim/{key}/{name}"])
    _restore_scheduler(optimizer, scheduler, meta["scheduler"])
    return int(meta["step"])


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
