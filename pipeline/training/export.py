"""A trained model out of its stages and shards: the whole state dict, and the export folder.

FastServe's own format (pipeline/models/checkpoint.py) for its GPT, LSTM and classifier; a Hugging
Face folder again (models/hf_format.export_hf) for a run fine-tuned from one. Both are
collectives: every rank calls them, rank 0 writes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .model_factory import build_model


def full_state(trainer, everyone: bool = False) -> dict | None:
    """The whole model's tensors (fp32, CPU) by name, assembled from every stage and shard:
    on rank 0 (None elsewhere), or on every rank. A collective: every rank calls it."""
    import numpy as np
    from torch.distributed.tensor import DTensor

    full = {}
    for name, q in trainer.named:
        t = q.full_tensor() if isinstance(q, DTensor) else q  # collective over q's mesh
        full[name] = t.detach().float().cpu().numpy()
    mine = full if (trainer.dp_rank == 0 and trainer.tp_rank == 0) else {}
    comm = trainer.env.comm  # in memory, between ranks: no file
    parts = comm.allgather(mine) if everyone else comm.gather(mine, root=0)
    if parts is None:
        return None
    state = {}
    for part in parts:
        state.update({k: torch.from_numpy(np.asarray(v)) for k, v in part.items()})
    if getattr(trainer.full.config, "tie_word_embeddings", False):  # one weight, both names
        state["lm_head.weight"] = state["wte.weight"]
    return state


def export(trainer, folder: Path) -> Path | None:
    """The export folder: FastServe's own checkpoint, or a Hugging Face folder for a run
    fine-tuned from one (rank 0 writes it; every rank takes part)."""
    from ..models.checkpoint import save_checkpoint

    state = trainer.full_state()
    if state is None:
        return None
    # the trained model's own class and config (one given through the API may differ from
    # what the job's [model] table describes: bias=False, say)
    if trainer.init_from:  # back to a Hugging Face folder
        from ..models.hf_format import export_hf
        from ..registry import ARCHS

        model = ARCHS[trainer.arch].model_class()(trainer.hf_cfg)
        model.load_state_dict(state, strict=True)
        extra = {"trained_with": asdict(trainer.job.parallel), "steps": trainer.job.train.steps,
                 "init_from": str(trainer.init_from)}  # fmt: skip
        return export_hf(model, trainer.init_from, folder, extra)
    model = (
        trainer.given_cls(trainer.given.config)
        if trainer.given is not None
        else build_model(
            trainer.job.model, trainer.vocab_size, trainer.job.train.seed, trainer.labels
        )
    )
    model.load_state_dict(state, strict=True)
    return save_checkpoint(
        folder,
        model,
        trainer.tokenizer_json,
        {"pad": "<pad>", "eos": "<|endoftext|>", "bos": "<|endoftext|>"},
        extra={"trained_with": asdict(trainer.job.parallel), "steps": trainer.job.train.steps},
    )
