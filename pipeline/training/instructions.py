"""Instruction data: a prompt and a response per row, the loss on the response only.

    [data]
    prompt_column = "prompt"         # with response_column: prompt + response + eos, as they are
    response_column = "response"
    # messages_column = "messages"   # or chat messages, rendered by the tokenizer's chat template

Each example becomes one row of seq_len + 1 token ids, right-padded, with a mask that is true on
the response's tokens (and its eos): the targets elsewhere are -100 and add nothing to the loss.
Rows that cannot be trained on are set aside with a reason and counted (data/rejected.json), as
`infer` does: null_prompt, empty_prompt, null_response, empty_response, no_assistant_reply,
too_long (an example longer than seq_len + 1 tokens is not cut: a cut response would teach the
model to stop mid-answer).

The loss of a step is the mean over every response token of the global batch, whatever the
layout: the trainer scales each micro-batch's summed loss by the step's token count (`valid`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import InputError
from ..inputs import resolve_inputs
from .data import PackedData

IGNORE = -100


def _rows(paths, columns: list[str]):
    for path in resolve_inputs(paths).values():
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(
                f"training corpus file {path} has no column {missing[0]!r}; set data."
                + ("messages_column" if len(columns) == 1 else "prompt_column / response_column")
                + f" (columns: {', '.join(names)})"
            )
        yield from pq.read_table(path, columns=columns).to_pylist()


def encode_examples(d, tokenizer_json: Path, eos: str, chat_folder: str | None):
    """(ids (N, seq_len + 1) int32, mask (N, seq_len + 1) bool, rejected {reason: count})."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tok.token_to_id(eos)
    pad = tok.token_to_id("<pad>") or 0
    width = d.seq_len + 1
    ids, masks, rejected = [], [], Counter()
    chat = None
    if d.messages_column:
        from transformers import AutoTokenizer

        chat = AutoTokenizer.from_pretrained(chat_folder, local_files_only=True)
        if not chat.chat_template:
            raise InputError(
                f"data.messages_column needs a chat template, and {chat_folder}'s tokenizer has "
                "none; use prompt_column and response_column"
            )
    columns = [d.messages_column] if chat else [d.prompt_column, d.response_column]
    for row in _rows(d.paths, columns):
        if chat:
            messages = row[d.messages_column]
            if not messages or messages[-1].get("role") != "assistant":
                rejected["no_assistant_reply"] += 1
                continue
            prompt = chat.apply_chat_template(
                messages[:-1], add_generation_prompt=True, tokenize=False
            )
            p_ids = tok.encode(prompt, add_special_tokens=False).ids
            response = messages[-1].get("content")
        else:
            prompt, response = row[d.prompt_column], row[d.response_column]
            if prompt is None or not isinstance(prompt, str):
                rejected["null_prompt"] += 1
                continue
            if not prompt.strip():
                rejected["empty_prompt"] += 1
                continue
            p_ids = tok.encode(prompt).ids
        if response is None or not isinstance(response, str):
            rejected["null_response"] += 1
            continue
        if not response.strip():
            rejected["empty_response"] += 1
            continue
        r_ids = tok.encode(response, add_special_tokens=False).ids + [eos_id]
        if len(p_ids) + len(r_ids) > width:
            rejected["too_long"] += 1
            continue
        row_ids = np.full(width, pad, dtype=np.int32)
        row_mask = np.zeros(width, dtype=bool)
        row_ids[: len(p_ids) + len(r_ids)] = p_ids + r_ids
        row_mask[len(p_ids) : len(p_ids) + len(r_ids)] = True
        ids.append(row_ids)
        masks.append(row_mask)
    if len(ids) < 2:
        raise InputError(
            f"the instruction corpus {list(d.paths)} gives {len(ids)} usable examples "
            f"(set aside: {dict(rejected) or 'none'}); at least 2 are needed"
        )
    return np.stack(ids), np.stack(masks), dict(rejected)


def save_examples(folder: Path, ids, mask, rejected) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mask.npy", mask, allow_pickle=False)
    (folder / "rejected.json").write_text(json.dumps(rejected))
    np.save(folder / "tokens.tmp.npy", ids, allow_pickle=False)
    (folder / "tokens.tmp.npy").replace(folder / "tokens.npy")  # last: it marks the cache whole


class InstructionData(PackedData):
    """Padded examples with a loss mask; the same (seed, step) -> batch rule as PackedData."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, val_fraction: float, seed: int):
        self.ids, self.mask, self.seed = ids, mask, seed
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = max(1, int(len(ids) * val_fraction))
        self.val, self.train = order[:n_val], order[n_val:]

    def _seqs(self, idx: np.ndarray):
        import torch

        ids = torch.from_numpy(self.ids[idx].astype(np.int64))
        keep = torch.from_numpy(self.mask[idx][:, 1:])
        return ids[:, :-1], torch.where(keep, ids[:, 1:], IGNORE)

    def valid(self, idx: np.ndarray) -> int:
        """Response tokens the targets of these examples hold."""
        return int(self.mask[idx][:, 1:].sum())

    def val_indices(self, k: int, batch_size: int) -> np.ndarray:
        return np.take(self.val, range(k * batch_size, (k + 1) * batch_size), mode="wrap")


class ArrayData(InstructionData):
    """In-memory arrays (the Python API's fit(x, y)): token ids x (N, L); with y (N,), the
    next token after each row (the loss on the last position only); without, x itself as a
    language-modelling corpus (each position predicts the next; pad id 0 targets ignored).
    `val_fraction` 0: no validation rows."""

    def __init__(self, x, y, val_fraction: float, seed: int):
        x = np.asarray(x, dtype=np.int64)
        if x.ndim != 2 or len(x) < 1:
            raise InputError(f"x has shape {x.shape}; expected (rows, sequence length) token ids")
        if y is None:
            ids, mask = x, x != 0
            mask[:, 0] = False
        else:
            y = np.asarray(y, dtype=np.int64).reshape(-1)
            if len(y) != len(x):
                raise InputError(
                    f"x has {len(x)} rows but y has {len(y)}; expected one label a row"
                )
            ids = np.concatenate([x, y[:, None]], axis=1)
            mask = np.zeros(ids.shape, dtype=bool)
            mask[:, -1] = True
        self.ids, self.mask, self.seed = ids, mask, seed
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = int(len(ids) * val_fraction) if val_fraction > 0 else 0
        if len(ids) - n_val < 1:
            raise InputError(f"validation_split {val_fraction} leaves no training rows")
        self.val, self.train = order[:n_val], order[n_val:]
