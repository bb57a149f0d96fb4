"""FastServe's own checkpoint format: what `fastserve train` exports and `fastserve infer` serves.

    <folder>/
      fastserve.json      {"format": "fastserve-checkpoint", "version": 1, "arch": "gpt",
                           "config": {...model config...}, "special_tokens": {"pad": "<pad>", ...}}
      model.safetensors   the full (consolidated) state dict, named as the unsplit model names it
      tokenizer.json      a `tokenizers` tokenizer

Safetensors only: no pickle is ever loaded. Both sides (training export, inference load) use
`save_checkpoint` / `load_checkpoint` here and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from ..registry import ARCHS

FORMAT = "fastserve-checkpoint"
VERSION = 1
META = "fastserve.json"

if TYPE_CHECKING:
    import torch
# torch is imported where weights are read or written: the client checks a checkpoint's header
# (is_checkpoint, read_meta) without it, which keeps a second of imports out of its start-up


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    tokenizer_json: str | Path,
    special_tokens: dict,
    extra: dict | None = None,
) -> Path:
    """Write `model` (unsplit), its tokenizer and its config as a FastServe checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(Path(tokenizer_json).read_text())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.arch,
        "config": model.config.to_dict(),
        "special_tokens": special_tokens,
        **(extra or {}),
    }
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def read_meta(folder: str | Path) -> dict:
    p = Path(folder) / META
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(
            f"{p} is not a readable FastServe checkpoint header ({e}); re-export it"
        ) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelError(
            f"{p}: expected format {FORMAT} version {VERSION}, got {meta.get('format')} {meta.get('version')}"
        )
    if meta.get("arch") not in ARCHS:
        raise ModelError(
            f"{p}: unknown arch {meta.get('arch')!r}; expected one of {', '.join(ARCHS)}"
        )
    return meta


def load_checkpoint(folder: str | Path, device="cpu", dtype=None):
    """(model, tokenizer, meta) from a FastServe checkpoint folder (float32 unless `dtype`)."""
    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    dtype = torch.float32 if dtype is None else dtype

    folder = Path(folder)
    meta = read_meta(folder)
    arch = ARCHS[meta["arch"]]
    model = arch.model_class()(arch.config_class()(**meta["config"]))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{folder}/model.safetensors does not match its {meta['arch']} config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    sp = meta.get("special_tokens", {})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        **{f"{k}_token": v for k, v in sp.items()},
        model_max_length=meta["config"].get("block_size", 1024),
    )
    return model.to(device=device, dtype=dtype).eval(), tokenizer, meta
