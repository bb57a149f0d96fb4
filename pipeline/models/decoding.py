"""Token-by-token decoding with a KV cache, for Hugging Face causal LMs and FastServe's GPT.

One loop serves both through a small adapter (prefill / step / keep). Rows are left-padded; a row
that finishes (eos, a stop string, its token limit) leaves the batch at once, so the rest step
cheaper. Sampling draws from a generator seeded by (seed, row id): a row's sample does not depend
on which rows share its batch, or on the worker it runs on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Greedy when `do_sample` is false; else temperature, then top-k, then top-p (as HF orders them)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


# Decode slots when task.batch_size is unset. A decode step is bound by memory traffic: it reads
# every weight once whatever the rows, and each row's keys and values. More rows are nearly free
# while their cache is small beside the weights, and buy nothing once it dominates (each row then
# brings as many bytes as it gets work). So: as many rows as make their cache about the weights'
# size, at their mean length, within bounds (measured, GPT-2-small, 2 threads, ~30-token cache:
# 64 rows 101 ms a step, 128 rows 156 ms, 256 rows 304 ms).
SLOTS_MAX = {"cpu": 128, "cuda": 512}
SLOTS_MIN = 8


def kv_bytes_per_token(config, dtype_bytes: int = 4) -> int:
    """Keys and values one token keeps in every layer."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "n_kv_head", heads)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 64)
    head_dim = getattr(config, "head_dim", None) or width // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def auto_slots(
    config, device, lengths: list[int], limits: list[int], dtype_bytes: int = 4, weights: int = 0
) -> int:
    """Rows to decode together: a KV cache (at the rows' mean length, prompt + new tokens) about
    the size of the `weights` (bytes), between 8 and the device's most, never more than the rows."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if not lengths:
        return 1
    mean = sum(a + b for a, b in zip(lengths, limits, strict=True)) / len(lengths)
    per_row = max(1.0, mean) * kv_bytes_per_token(config, dtype_bytes)
    fits = int(weights // per_row)
    return max(1, min(len(lengths), SLOTS_MAX[kind], max(SLOTS_MIN, fits)))


def row_generator(seed: int, row_id: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{row_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def next_tokens(
    logits: torch.Tensor, s: Sampling, gens: list[torch.Generator] | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not s.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(s.temperature, 1e-6)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - s.top_p)
        drop[:, -1] = False  # keep at least one token
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(dim=-1).cpu()
    assert gens is not None
    return torch.stack(
        [torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(gens)]
    ).to(logits.device)


GREEDY = Sampling()


def rows_next_tokens(
    logits: torch.Tensor, samplings: list[Sampling], gens: list[torch.Generator] | None
) -> list[int]:
    """next_tokens with each row's own Sampling: rows that share one are drawn together."""
    out = [0] * len(samplings)
    groups: dict[Sampling, list[int]] = {}
    for j, s in enumerate(samplings):
        groups.setdefault(s, []).append(j)
    for s, rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        picked = next_tokens(logits[idx], s, [gens[j] for j in rows] if gens else None)
        for j, t in zip(rows, picked.tolist(), strict=True):
            out[j] = t
    return out


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, longest - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join_kv(
    a: list, a_mask: torch.Tensor, b: list, b_mask: torch.Tensor
) -> tuple[list, torch.Tensor]:
    """Two batches' per-layer (keys, values) of shape (B, H, S, D), and their (B, S) masks, as one
    batch: the shorter side is left-padded with masked positions."""
    s = max(a_mask.shape[1], b_mask.shape[1])
    da, db = s - a_mask.shape[1], s - b_mask.shape[1]
    layers = [
        (
            torch.cat([_pad_left(ka, da, 2), _pad_left(kb, db, 2)]),
            torch.cat([_pad_left(va, da, 2), _pad_left(vb, db, 2)]),
        )
        for (ka, va), (kb, vb) in zip(a, b, strict=True)
    ]
    return layers, torch.cat([_pad_left(a_mask, da, 1), _pad_left(b_mask, db, 1)])


def trim_kv(layers: list, mask: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Drop the leading positions no row attends to (left padding of rows that have left)."""
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first == 0:
        return layers, mask
    return [(k[:, :, first:], v[:, :, first:]) for k, v in layers], mask[:, first:]


def prefix_groups(
    rows: list[list[int]], known: list[tuple[int, ...]], least: int
) -> list[tuple[tuple[int, ...], list[int]]]:
    """Rows grouped by the prefix they are prefilled after: [(prefix, row indices)], prefix ()
    for rows prefilled whole. A row takes the longest `known` prefix it starts with (leaving it
    at least one token of its own: its last position's logits are needed); of the others, the
    largest set sharing their first `least` tokens gets its longest common prefix."""
    known = sorted(known, key=len, reverse=True)
    groups: dict[tuple[int, ...], list[int]] = {}
    rest: list[int] = []
    for i, r in enumerate(rows):
        p = next((p for p in known if len(p) < len(r) and tuple(r[: len(p)]) == p), None)
        groups.setdefault(p, []).append(i) if p else rest.append(i)
    heads: dict[tuple[int, ...], list[int]] = {}
    for i in rest:
        if len(rows[i]) > least:
            heads.setdefault(tuple(rows[i][:least]), []).append(i)
    if heads:
        members = max(heads.values(), key=len)
        first, room = rows[members[0]], min(len(rows[i]) for i in members) - 1
        n = least
        while n < room and all(rows[i][n] == first[n] for i in members):
            n += 1
        if len(members) > 1:  # one row alone: its prompt is no one else's prefix (yet)
            groups.setdefault(tuple(first[:n]), []).extend(members)
            rest = [i for i in rest if i not in set(members)]
    if rest:
        groups[()] = rest
    return list(groups.items())


class HFCausalLM:
    """A transformers causal LM behind the decoding interface (DynamicCache, left padding).

    Shared prefixes: rows that start with the same tokens (a system message, a template's
    instructions) are prefilled after that prefix's keys and values, computed once per worker
    and model and kept (the few most recent): each row's own tokens follow the prefix, left-padded
    among themselves, so the padding sits between prefix and row, masked."""

    PREFIX_MIN = 16
    """Fewest shared tokens worth a prefix of their own."""
    PREFIXES = 4
    """Prefixes kept per worker and model."""

    def __init__(self, model, device, reuse_prefix: bool = True):
        import inspect

        self.model, self.device = model, device
        self.reuse_prefix = reuse_prefix
        self.prefixes: dict[tuple[int, ...], list] = {}  # prefix tokens -> per-layer (k, v)
        # transformers renamed `past_key_values` to `cache` (5.2x); the cache is updated in place
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prompt's logits are not needed, only the last position's (a third of GPT-2's compute)
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list | None:
        """The prefix's per-layer (keys, values), batch 1: computed once, then kept."""
        from .kv_cache import growing_cache

        if prefix in self.prefixes:
            self.prefixes[prefix] = self.prefixes.pop(prefix)  # most recent last
            return self.prefixes[prefix]
        cache = growing_cache(self.model.config)
        ids = torch.tensor([prefix], device=self.device)
        self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache}, **self.last_only)
        if not all(hasattr(layer, "set") for layer in cache.layers):
            return None  # a cache this adapter cannot seed (sliding windows): no reuse
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        self.prefixes[prefix] = kv
        while len(self.prefixes) > self.PREFIXES:
            self.prefixes.pop(next(iter(self.prefixes)))
        return kv

    def prefill(self, rows: list[list[int]], pad_id: int):
        if not self.reuse_prefix:
            return self._prefill(rows, pad_id)
        groups = prefix_groups(rows, list(self.prefixes), self.PREFIX_MIN)
        parts = []
        for prefix, members in groups:
            kv = self._prefix_kv(prefix) if prefix else None
            chosen = [rows[i] for i in members]
            parts.append(
                self._prefill_after(prefix, kv, chosen, pad_id)
                if kv is not None
                else self._prefill(chosen, pad_id)
            )
        if len(parts) == 1:
            return parts[0]
        logits, st = parts[0]
        for more_logits, more in parts[1:]:  # the groups side by side, then in the rows' order
            logits, st = torch.cat([logits, more_logits]), self.join(st, more)
        order = [i for _, members in groups for i in members]
        back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=logits.device)
        return logits[back], self.keep(st, back)

    def _prefill(self, rows: list[list[int]], pad_id: int):
        """Prefill `rows` whole, left-padded."""
        from .kv_cache import growing_cache

        ids, mask = left_pad(rows, pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
            **self.last_only,
        )
        return out.logits[:, -1], {
            "cache": cache,
            "mask": mask,
            "pos": positions[:, -1],
        }

    def _prefill_after(self, prefix: tuple[int, ...], kv: list, rows: list[list[int]], pad_id: int):
        """Prefill `rows` after the cached keys and values of their shared `prefix`."""
        from .kv_cache import growing_cache

        n, p = len(rows), len(prefix)
        ids, own = left_pad([r[p:] for r in rows], pad_id, self.device)
        mask = torch.cat([own.new_ones((n, p)), own], dim=1)
        positions = p + (own.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache(self.model.config)
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            layer.set(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
            **self.last_only,
        )
        return out.logits[:, -1], {"cache": cache, "mask": mask, "pos": positions[:, -1]}

    def step(self, tokens: torch.Tensor, st: dict):
        st["mask"] = torch.cat([st["mask"], st["mask"].new_ones((len(tokens), 1))], dim=1)
        st["pos"] = st["pos"] + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=st["mask"],
            position_ids=st["pos"][:, None],
            use_cache=True,
            **{self.cache_kw: st["cache"]},
        )
        return out.logits[:, -1], st

    def keep(self, st: dict, rows: torch.Tensor) -> dict:
        st["cache"].batch_select_indices(rows)
        st["mask"], st["pos"] = st["mask"][rows], st["pos"][rows]
        return st

    def refill(self, st: dict, slots: list[int], new: dict) -> dict | None:
        """Rows prefilled since (`new`) take the `slots` of finished rows, in place: their cache
        is written at the end of the running one, the positions before it masked. None when
        they are longer than the running cache (the caller joins them instead)."""
        layers = st["cache"].layers
        S, L = st["mask"].shape[1], new["mask"].shape[1]
        if L > S or not all(hasattr(layer, "write_rows") for layer in layers):
            return None
        rows = torch.tensor(slots, device=st["mask"].device)
        for layer, fresh in zip(layers, new["cache"].layers, strict=True):
            layer.write_rows(rows, fresh.keys, fresh.values)
        mask = st["mask"].clone()
        mask[rows] = 0
        mask[rows, S - L :] = new["mask"]
        st["pos"] = st["pos"].clone()
        st["pos"][rows] = new["pos"]
        # the finished rows' old positions are free now: drop those no row attends to
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        for layer in layers:
            layer.trim(first)
        st["mask"] = mask[:, first:]
        return st

    def join(self, st: dict, new: dict) -> dict:
        """Rows prefilled since (`new`) join the running batch (`st`), after it."""
        cache = st["cache"]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        kv_new = [(layer.keys, layer.values) for layer in new["cache"].layers]
        kv, mask = trim_kv(*join_kv(kv, st["mask"], kv_new, new["mask"]))
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            if hasattr(layer, "set"):
                layer.set(k, v)
            else:
                layer.keys, layer.values = k, v
        return {"cache": cache, "mask": mask, "pos": torch.cat([st["pos"], new["pos"]])}


class GPTCausalLM:
    """FastServe's GPT (models/gpt.py) behind the decoding interface."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    @staticmethod
    def _mask(keys: torch.Tensor, t: int) -> torch.Tensor:
        """(B, 1, t, S) allowed-attention mask: key not padding, and not in the future."""
        S = keys.shape[1]
        causal = torch.ones((t, S), dtype=torch.bool, device=keys.device).tril(diagonal=S - t)
        return keys.bool()[:, None, None, :] & causal[None, None]

    def prefill(self, rows: list[list[int]], pad_id: int):
        ids, mask = left_pad(rows, pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, caches = self.model.forward_cached(
            ids, positions, self._mask(mask, ids.shape[1]), None
        )
        return logits, {"cache": caches, "mask": mask, "pos": positions[:, -1]}

    def step(self, tokens: torch.Tensor, st: dict):
        st["mask"] = torch.cat([st["mask"], st["mask"].new_ones((len(tokens), 1))], dim=1)
        st["pos"] = st["pos"] + 1
        logits, st["cache"] = self.model.forward_cached(
            tokens[:, None], st["pos"][:, None], self._mask(st["mask"], 1), st["cache"]
        )
        return logits, st

    def keep(self, st: dict, rows: torch.Tensor) -> dict:
        st["cache"] = [(k[rows], v[rows]) for k, v in st["cache"]]
        st["mask"], st["pos"] = st["mask"][rows], st["pos"][rows]
        return st

    def join(self, st: dict, new: dict) -> dict:
        cache, mask = trim_kv(*join_kv(st["cache"], st["mask"], new["cache"], new["mask"]))
        return {"cache": cache, "mask": mask, "pos": torch.cat([st["pos"], new["pos"]])}


class LSTMCausalLM:
    """FastServe's LSTM LM (models/lstm.py): prompts are read one by one (padding would enter the
    recurrent state), then the batch steps together."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def _run(self, x: torch.Tensor, states: list | None):
        x = self.model.wte(x)
        new = []
        for i, layer in enumerate(self.model.layers.values()):
            x, st = layer.lstm(x, states[i] if states else None)
            new.append(st)
        return self.model.lm_head(x[:, -1]), new

    def prefill(self, rows: list[list[int]], pad_id: int):
        outs = [self._run(torch.tensor([r], device=self.device), None) for r in rows]
        logits = torch.cat([o[0] for o in outs])
        layers = len(outs[0][1])
        states = [
            (
                torch.cat([o[1][k][0] for o in outs], dim=1),
                torch.cat([o[1][k][1] for o in outs], dim=1),
            )
            for k in range(layers)
        ]  # per layer (h, c): (1, B, C)
        return logits, {"states": states}

    def step(self, tokens: torch.Tensor, st: dict):
        logits, st["states"] = self._run(tokens[:, None], st["states"])
        return logits, st

    def keep(self, st: dict, rows: torch.Tensor) -> dict:
        st["states"] = [(h[:, rows], c[:, rows]) for h, c in st["states"]]
        return st

    def join(self, st: dict, new: dict) -> dict:
        states = [
            (torch.cat([h, h2], dim=1), torch.cat([c, c2], dim=1))
            for (h, c), (h2, c2) in zip(st["states"], new["states"], strict=True)
        ]
        return {"states": states}


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish_reason: str
    """eos, stop (a stop string was produced; the text ends before it) or length."""


def generate(
    lm,
    tokenizer,
    prompts: list[list[int]],
    ids: list[str],
    max_new_tokens: list[int],
    sampling: Sampling | list[Sampling],
    eos_ids: set[int],
    stop: tuple[str, ...] | list[tuple[str, ...]] = (),
    slots: int | None = None,
    constraints=None,
) -> list[Generated]:
    """Decode every prompt (token ids) to completion; results in input order.

    Continuous batching: at most `slots` rows decode together (all of them when None). A row
    that finishes (eos, a stop string, its token limit) is done at once; its slot is refilled
    from the queue as soon as a few slots are free: the newcomers are prefilled and written
    into the finished rows' slots in place where the model's cache allows it (else the batch is
    compacted and they join it, left-padded to its cache length). Admission is longest-first (most new tokens allowed, then longest prompt), so
    the rows that take longest start first and no straggler runs alone at the end.

    `sampling` and `stop` are the same for every row, or one per row (Batch-API requests carry
    their own temperature, top_p, seed and stop strings).

    `constraints` (models/constraints.py RowConstraints): rows with a grammar draw only tokens
    it allows (their logits masked before greedy or sampled choice), in the same batches as free
    rows; a row whose grammar is complete ends there ("eos": the end is all it allows).
    """
    n = len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    row_sampling = sampling if isinstance(sampling, list) else [sampling] * n
    row_stop = stop if isinstance(stop, list) else [stop] * n
    sampled = any(s.do_sample for s in row_sampling)
    gens = (
        [row_generator(s.seed, i) for s, i in zip(row_sampling, ids, strict=True)]
        if sampled
        else None
    )
    out: list[list[int]] = [[] for _ in range(n)]
    result: list[Generated | None] = [None] * n
    for i in range(n):
        if max_new_tokens[i] <= 0:
            result[i] = Generated([], "", "length")
    queue = sorted(
        (i for i in range(n) if max_new_tokens[i] > 0),
        key=lambda i: (-max_new_tokens[i], -len(prompts[i]), i),
    )
    slots = slots or max(1, len(queue))
    # The batch's rows; a finished row becomes None (a dead slot, still computed, its output
    # ignored) until the batch is compacted: compacting copies the whole cache, so it is done
    # once a few slots are dead (refill_at), together with the refill that fills them again.
    live: list[int | None] = []
    logits, st = None, None
    refill_at = max(1, slots // 8)
    idle = torch.Generator().manual_seed(0)  # what dead slots draw from, when sampling

    def finished(i: int, t: int) -> bool:
        if t in eos_ids:
            result[i] = Generated(out[i], tokenizer.decode(out[i], skip_special_tokens=True), "eos")
            return True
        out[i].append(t)
        complete = constraints is not None and constraints.advance(i, t)
        if row_stop[i]:  # a stop string ends the text, also on the token that completes a grammar
            text = tokenizer.decode(out[i], skip_special_tokens=True)
            cut = min((text.find(s) for s in row_stop[i] if s in text), default=-1)
            if cut >= 0:
                result[i] = Generated(out[i], text[:cut], "stop")
                return True
        if complete:
            result[i] = Generated(out[i], tokenizer.decode(out[i], skip_special_tokens=True), "eos")
            return True
        if len(out[i]) >= max_new_tokens[i]:
            result[i] = Generated(
                out[i], tokenizer.decode(out[i], skip_special_tokens=True), "length"
            )
            return True
        return False

    while queue or any(i is not None for i in live):
        alive = [j for j, i in enumerate(live) if i is not None]
        free = slots - len(alive)
        dead = len(live) - len(alive)
        if (queue and free >= min(refill_at, len(queue))) or dead >= refill_at or not alive:
            admit: list[int] = []
            if queue and free:  # newcomers for the free slots
                admit, queue = queue[:free], queue[free:]
                new_logits, new_st = lm.prefill([prompts[i] for i in admit], pad)
            dead_slots = [j for j, i in enumerate(live) if i is None]
            if (
                admit
                and alive
                and len(admit) <= dead
                and hasattr(lm, "refill")
                and (placed := lm.refill(st, dead_slots[: len(admit)], new_st)) is not None
            ):  # in place, into the dead slots: no copy of the running cache
                st = placed
                logits = logits.clone()
                logits[torch.tensor(dead_slots[: len(admit)])] = new_logits
                for j, i in zip(dead_slots, admit, strict=False):
                    live[j] = i
                admit = []
            elif dead:  # compact: one copy of the running rows
                if alive:
                    st = lm.keep(st, torch.tensor(alive, device=logits.device))
                    logits, live = logits[alive], [live[j] for j in alive]
                else:
                    logits, st, live = None, None, []
            if admit:  # the newcomers join after the running rows
                if live:
                    logits, st = torch.cat([logits, new_logits]), lm.join(st, new_st)
                else:
                    logits, st = new_logits, new_st
                live += admit
        rows_gens = [gens[i] if i is not None else idle for i in live] if gens else None
        if constraints is not None:
            constraints.mask(logits, live)
        if isinstance(sampling, Sampling):
            toks = next_tokens(logits, sampling, rows_gens).tolist()
        else:  # rows grouped by their own sampling parameters (dead slots: greedy)
            toks = rows_next_tokens(
                logits, [row_sampling[i] if i is not None else GREEDY for i in live], rows_gens
            )
        for j, (i, t) in enumerate(zip(live, toks, strict=True)):
            if i is not None and finished(i, t):
                live[j] = None
        if not queue and all(i is None for i in live):
            break
        logits, st = lm.step(torch.tensor(toks, device=logits.device), st)
    return result  # type: ignore[return-value]
