"""Parallelism applied by functions, in a fixed order, without changing the model's code:

    1. pipeline split   the model -> stage chunks (layers it does not own removed; names kept)
    2. tensor parallel  each chunk's attention and MLP split by column / row (DTensor)
    3. data parallel    each chunk sharded (FSDP2) or replicated (DDP) over the dp mesh

(torchtitan's order: TP before data parallel, so FSDP shards the TP-local tensors.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def stage_layers(n_layer: int, n_stages: int) -> list[list[int]]:
    """Layer indices of each stage, balanced by count (earlier stages take the remainder)."""
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def rank_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stage indices a pipeline rank holds: looped (rank r holds r, r+pp, ...), as interleaved
    schedules expect; one stage per rank otherwise."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` holding only stage `stage`'s layers; embeddings stay on the first stage,
    the final norm and head on the last. Parameter names are those of the full model."""
    chunk = copy.deepcopy(model)
    keep = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage]}
    for name in list(chunk.layers.keys()):
        if name not in keep:
            del chunk.layers[name]
    if stage > 0:
        for attr in ("wte", "wpe", "drop"):
            if hasattr(chunk, attr):
                setattr(chunk, attr, None)
    if stage < n_stages - 1:
        for attr in ("ln_f", "lm_head"):
            if hasattr(chunk, attr):
                setattr(chunk, attr, None)
    return chunk


def apply_tp(chunk: nn.Module, tp_mesh) -> None:
    """Split attention heads (q/k/v by column, o by row) and the MLP (fc, or gate and up, by
    column; proj or down by row) over `tp_mesh`, by the model's `tp_plan`. Embeddings, norms and
    the head stay replicated."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    names = getattr(chunk, "tp_plan", None) or {  # the model's own plan, else the GPT's
        "attn.q_proj": "colwise",
        "attn.k_proj": "colwise",
        "attn.v_proj": "colwise",
        "attn.o_proj": "rowwise",
        "mlp.fc": "colwise",
        "mlp.proj": "rowwise",
    }
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in names.items()}
    for layer in chunk.layers.values():
        parallelize_module(layer, tp_mesh, plan)


def apply_fsdp(chunk: nn.Module, dp_mesh, pipelined: bool) -> None:
    """FSDP2: each layer a unit, then the rest. In a pipeline, parameters stay gathered between
    micro-batches (resharding each one would gather them again for every micro-batch)."""
    from torch.distributed.fsdp import fully_shard

    for layer in chunk.layers.values():
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=not pipelined)
    fully_shard(chunk, mesh=dp_mesh, reshard_after_forward=not pipelined)


def apply_ddp(chunk: nn.Module, dp_group, device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        chunk, process_group=dp_group, device_ids=[device] if device.type == "cuda" else None
    )


def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, pp_group=None, uncounted=frozenset()
) -> torch.Tensor:
    """Clip by the norm over *all* gradients of the model: every stage and every shard.
    `uncounted`: ids of parameters clipped but not counted (a second copy of a tied weight).

    DTensor gradients (TP, FSDP) reduce over their own mesh; plain ones are replicated across TP
    ranks and counted once; the squares are then summed over the pipeline stages.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    by_mesh: dict = {}
    for g in (p.grad for p in params if p.grad is not None and id(p) not in uncounted):
        if isinstance(g, DTensor):
            by_mesh.setdefault(id(g.device_mesh), []).append(g)
        else:
            sq = sq + g.detach().float().pow(2).sum().cpu()
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq = sq + n.float().pow(2).cpu()
    if pp_group is not None:
        device = grads[0].device if grads else torch.device("cpu")
        sq = sq.to(device)  # NCCL reduces on the GPU, gloo anywhere
        dist.all_reduce(sq, group=pp_group)
    total = float(sq.sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)  # a Python scalar: works for DTensor and plain gradients alike
    return torch.tensor(total)


@dataclass
class Parallelized:
    """One rank's part of a model, as parallelize() made it."""

    chunks: list[nn.Module]
    """This rank's stage chunks, unwrapped: their parameter names are the whole model's."""
    runnable: list[nn.Module]
    """What runs: the chunks, or their DDP wrappers."""
    stage_ids: list[int]
    n_stages: int
    mesh: object
    """The ('pp', 'dp', 'tp') DeviceMesh: always built, one process included."""
    coords: dict[str, int] = field(default_factory=dict)
    """This rank's place on each mesh dimension."""
    pp_group: object = None
    """The pipeline's process group (None without pipeline stages)."""

    @property
    def is_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def is_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids


def parallelize(
    model: nn.Module,
    dims,
    mesh,
    cfg,
    device,
    load_weights: Callable[[nn.Module], None] | None = None,
) -> Parallelized:
    """Split `model` over the mesh in the fixed order: pipeline stages, then tensor parallelism,
    then data parallelism (FSDP2 or DDP, `cfg.dp_mode`). `cfg`: the [parallel] table (pp,
    stages_per_rank, dp_mode). `load_weights(chunk)`: for a model built on the meta device, fills
    one stage chunk's tensors on `device` (each stage reads only its own); otherwise chunks are
    moved to `device`."""
    pp_rank, dp_rank, tp_rank = (mesh[d].get_local_rank() for d in ("pp", "dp", "tp"))
    n_stages = dims.pp * cfg.stages_per_rank
    stage_ids = rank_stages(pp_rank, dims.pp, cfg.stages_per_rank) if dims.pp > 1 else [0]
    chunks = [split_stage(model, s, n_stages) if dims.pp > 1 else model for s in stage_ids]
    for c in chunks:
        if load_weights is not None:  # on meta: split first, then each rank reads its slices
            if dims.tp > 1:
                apply_tp(c, mesh["tp"])
            load_weights(c)
        c.to(device)
        if dims.tp > 1 and load_weights is None:
            apply_tp(c, mesh["tp"])
    runnable = chunks
    if dims.dp > 1 and cfg.dp_mode == "fsdp":
        for c in chunks:
            apply_fsdp(c, mesh["dp"], pipelined=dims.pp > 1)
    elif dims.dp > 1:
        runnable = [apply_ddp(c, mesh["dp"].get_group(), device) for c in chunks]
    return Parallelized(
        chunks=chunks,
        runnable=runnable,
        stage_ids=stage_ids,
        n_stages=n_stages,
        mesh=mesh,
        coords={"pp": pp_rank, "dp": dp_rank, "tp": tp_rank},
        pp_group=mesh["pp"].get_group() if dims.pp > 1 else None,
    )
