"""Tokenize once, flag over-long rows, and pad length-sorted batches: shared by encoder tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import length_sorted_batches

# Unset task.batch_size / task.max_tokens for encoders: the token budget decides, and rows only
# cap batches of very short rows. On CPU, batches of about 2k padded tokens ran fastest (measured:
# DistilBERT and MiniLM, 256-8192 tokens per batch; past ~4k the activations leave the cache).
ENCODER_ROWS = 256
CPU_TOKENS, GPU_TOKENS = 2048, 16384


def batch_limits(cfg, device) -> tuple[int, int]:
    """(most rows, most padded tokens) per model call for an encoder task, defaults filled in."""
    rows = cfg.batch_size or ENCODER_ROWS
    if cfg.max_tokens is not None:
        return rows, cfg.max_tokens
    return rows, CPU_TOKENS if torch.device(device).type == "cpu" else GPU_TOKENS


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]
    """Per row: input_ids, attention_mask (and token_type_ids where the tokenizer makes them)."""
    truncated: list[bool]
    lengths: list[int]


def model_max_length(tokenizer, config) -> int:
    """The longest input the model takes: the tokenizer's limit, capped by the position table."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 1e9 else []
    pos = getattr(config, "max_position_embeddings", None)
    if pos:
        limits.append(int(pos))
    return min(limits) if limits else 512


def encode(
    tokenizer,
    texts: list[str],
    max_length: int,
    pairs: list[str] | None = None,
    truncation: str = "only_first",
) -> Encoded:
    """Tokenize all texts in one batch call, truncating to `max_length` exactly as
    `tokenizer(text, truncation=True, max_length=...)` would, and note which rows were cut.
    `pairs`: a second text per row, cut as `truncation` says: only_first (classify: the premise,
    never the hypothesis) or longest_first (rerank: tokens off the longer text, as a
    cross-encoder does)."""
    if not texts:  # (the tokenizer fails on none)
        return Encoded(features=[], truncated=[], lengths=[])
    if pairs is not None and truncation == "longest_first":
        # the tokenizer cannot report overflow for longest_first: compare with the whole lengths
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        whole = [
            len(a) + len(b) + tokenizer.num_special_tokens_to_add(pair=True)
            for a, b in zip(
                tokenizer(texts, add_special_tokens=False)["input_ids"],
                tokenizer(pairs, add_special_tokens=False)["input_ids"],
                strict=True,
            )
        ]
        keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
        features = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
        return Encoded(
            features=features,
            truncated=[n > max_length for n in whole],
            lengths=[len(f["input_ids"]) for f in features],
        )
    enc = tokenizer(
        texts,
        pairs,
        truncation="only_first" if pairs is not None else True,
        max_length=max_length,
        return_overflowing_tokens=True,
        stride=0,
        padding=False,
    )
    mapping = enc.pop("overflow_to_sample_mapping")
    keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    features: list[dict[str, list[int]] | None] = [None] * len(texts)
    truncated = [False] * len(texts)
    for j, i in enumerate(mapping):
        if features[i] is None:  # the first window is what plain truncation keeps
            features[i] = {k: enc[k][j] for k in keys}
        else:
            truncated[i] = True
    lengths = [len(f["input_ids"]) for f in features]  # type: ignore[index]
    return Encoded(features=features, truncated=truncated, lengths=lengths)  # type: ignore[arg-type]


def pad_batch(features: list[dict[str, list[int]]], pad_id: int, side: str, device) -> dict:
    """Stack rows into tensors padded to the batch's longest row (through pinned host memory
    to a GPU, so the copy does not stall)."""
    longest = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for f in features:
            gap = [fill] * (longest - len(f[key]))
            rows.append(gap + f[key] if side == "left" else f[key] + gap)
        t = torch.tensor(rows, dtype=torch.long)
        if torch.device(device).type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        out[key] = t
    return out


class EncoderRows:
    """Texts tokenized once, over-long rows set aside (on_long=reject) or truncated, and the
    rest served as length-sorted, padded batches: the common front of the encoder tasks."""

    def __init__(
        self,
        tokenizer,
        texts: list[str],
        max_length: int,
        on_long: str,
        pairs=None,
        truncation: str = "only_first",
    ):
        self.tokenizer = tokenizer
        self.enc = encode(tokenizer, texts, max_length, pairs, truncation)
        self.rejected: list[tuple[int, str, str]] = []
        self.todo = list(range(len(texts)))
        if on_long == "reject":
            detail = f"longer than {max_length} tokens (task.on_long=reject)"
            self.rejected = [(i, "too_long", detail) for i in self.todo if self.enc.truncated[i]]
            self.todo = [i for i in self.todo if not self.enc.truncated[i]]

    def run(self, fn, cfg, device, padding_side: str | None = None):
        """Yield (row indices, fn(padded input tensors)) per batch, longest rows first; batches
        hold at most the task's batch_size rows and max_tokens padded tokens (`batch_limits`;
        0: no budget). On GPU
        out-of-memory a batch is halved and retried; a row that does not fit alone is rejected
        (reason oom), so a shard is never lost to one long row."""
        lengths = [self.enc.lengths[i] for i in self.todo]
        batch_size, max_tokens = batch_limits(cfg, device)
        for batch in length_sorted_batches(lengths, batch_size, max_tokens or None):
            yield from self._run([self.todo[b] for b in batch], fn, device, padding_side)

    def _run(self, rows: list[int], fn, device, padding_side: str | None):
        tok = self.tokenizer
        feats = [self.enc.features[i] for i in rows]
        inputs = pad_batch(feats, tok.pad_token_id or 0, padding_side or tok.padding_side, device)
        try:
            out = fn(inputs)
        except torch.OutOfMemoryError:
            del inputs
            torch.cuda.empty_cache()
            if len(rows) == 1:
                n = self.enc.lengths[rows[0]]
                self.rejected.append((rows[0], "oom", f"{n} tokens do not fit in GPU memory"))
                return
            half = len(rows) // 2
            yield from self._run(rows[:half], fn, device, padding_side)
            yield from self._run(rows[half:], fn, device, padding_side)
            return
        yield rows, out
