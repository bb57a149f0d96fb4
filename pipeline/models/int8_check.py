"""A run with `model.dtype = "int8"` checks itself: each worker runs its first rows through the
float32 model too, compares, and refuses to go on below `model.int8_min_agreement`.

    part = check_int8(task, texts, ids, extra, threshold, got=out)  # None once checked

What is compared is what the task writes: labels (sentiment, classify), answer spans (qa),
embeddings by cosine (embed, and recommend's query vectors), the order of pairs of scores
(rerank: of one query's candidates, or of all rows of pairs). Each shard record holds the part
of the check done in it (`int8_check`); `summarize` adds them up for `fastserve status` and the
report. The run stops when the agreement's 95% upper bound is below the threshold
(`upper_bound`): a few unlucky rows do not stop a good model. This module imports no torch:
status reads it.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ModelError

# In the run's fingerprint with dtype int8 (quantize.py's scheme): another scheme, other rows.
SCHEME = "int8-sq0.7-v1"
CHECK_ROWS = 256
"""Rows per worker run in float32 as well (from its first shards)."""
DEFAULT_MIN_AGREEMENT = 0.99

WHAT = {
    "labels": "labels",
    "answers": "answer spans",
    "cosine": "embeddings",
    "order": "score orders",
}


class Int8Disagrees(ModelError):
    """The int8 model's results are too far from float32's on the rows checked."""


def _column(values) -> list:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def _rows(out) -> dict[tuple, dict[str, Any]]:
    """{(row, item): {column: value}} of a TaskOutput (item: rerank's candidates, else None)."""
    per = out.per_row or [1] * len(out.kept)
    cols = {k: _column(v) for k, v in out.columns.items()}
    n = sum(per)
    items = cols.get("item_id") or [None] * n
    keys = [
        (i, items[j])
        for j, i in enumerate(r for r, m in zip(out.kept, per, strict=True) for _ in range(m))
    ]
    return {k: {c: v[j] for c, v in cols.items()} for j, k in enumerate(keys)}


def metric_of(columns) -> str:
    if "embedding" in columns:
        return "cosine"
    if "label" in columns:
        return "labels"
    if "answer" in columns:
        return "answers"
    return "order"


def compare(texts: list[str], ref, got) -> dict:
    """The check's sums over the rows both outputs kept: float32's (`ref`) against int8's."""
    a, b = _rows(ref), _rows(got)
    keys = sorted(k for k in a if k in b)
    metric = metric_of(ref.columns)
    part: dict[str, Any] = {"metric": metric, "rows": len({k[0] for k in keys})}
    if metric == "labels":
        part["agree"] = sum(a[k]["label"] == b[k]["label"] for k in keys)
    elif metric == "answers":
        span = ("start", "end")
        part["agree"] = sum([a[k][s] for s in span] == [b[k][s] for s in span] for k in keys)
    elif metric == "cosine":
        cos = []
        for k in keys:
            x, y = a[k]["embedding"], b[k]["embedding"]
            nx = math.sqrt(sum(v * v for v in x))
            ny = math.sqrt(sum(v * v for v in y))
            dot = sum(p * q for p, q in zip(x, y, strict=True))
            cos.append(dot / (nx * ny) if nx and ny else float(nx == ny))
        part["cosine_sum"] = sum(cos)
        part["cosine_sq"] = sum(c * c for c in cos)
        part["cosine_min"] = min(cos, default=1.0)
    else:  # rerank: pairs of scores, of one query's candidates (or of all the rows' pairs)
        groups: dict[Any, list[tuple]] = {}
        for k in keys:
            groups.setdefault(k[0] if k[1] is not None else None, []).append(k)
        pairs = concordant = 0
        for g in groups.values():
            for i, p in enumerate(g):
                for q in g[i + 1 :]:
                    d_ref = a[p]["score"] - a[q]["score"]
                    if abs(d_ref) < 1e-6:  # float32 ties them: no order to keep
                        continue
                    pairs += 1
                    concordant += (d_ref > 0) == (b[p]["score"] - b[q]["score"] > 0)
        part["pairs"], part["concordant"] = pairs, concordant
    return part


def merge(total: dict | None, part: dict) -> dict:
    """Two parts of one metric added up."""
    if not total:
        return dict(part)
    out = dict(total)
    for key in ("rows", "agree", "pairs", "concordant", "cosine_sum", "cosine_sq"):
        if key in part:
            out[key] = out.get(key, 0) + part[key]
    if "cosine_min" in part:
        out["cosine_min"] = min(out.get("cosine_min", 1.0), part["cosine_min"])
    return out


def agreement(d: dict) -> float | None:
    """The figure compared with the threshold: the share of labels or answers that agree, the
    mean cosine, the share of score pairs in the same order. None: nothing compared."""
    if d["metric"] == "order":
        return d["concordant"] / d["pairs"] if d.get("pairs") else None
    if not d.get("rows"):
        return None
    if d["metric"] == "cosine":
        return d["cosine_sum"] / d["rows"]
    return d["agree"] / d["rows"]


Z = 1.645  # one-sided 95%


def upper_bound(d: dict) -> float | None:
    """The agreement's one-sided 95% upper bound: the run stops when even that is below the
    threshold, so a model whose true agreement meets it is rarely stopped by the luck of a few
    hundred rows (labels: 6 or more of 256 differing stop it at 0.99, one in 256 does not).
    Labels, answers and score orders: Wilson's bound (score pairs counted as the rows they come
    from); cosine: the mean plus Z standard errors."""
    a = agreement(d)
    if a is None:
        return None
    n = d["rows"]
    if d["metric"] == "cosine":
        var = max(d.get("cosine_sq", a * a * n) / n - a * a, 0.0)
        return a + Z * math.sqrt(var / n)
    z2 = Z * Z
    center = (a + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(a * (1 - a) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return min(1.0, center + half)


def describe(d: dict, threshold: float | None = None) -> str:
    """One line: what was compared, on how many rows, the agreement (and the threshold)."""
    a = agreement(d)
    limit = f"; threshold {threshold}" if threshold is not None else ""
    if a is None:
        return f"int8 vs float32: nothing compared yet ({d.get('rows', 0)} rows){limit}"
    if d["metric"] == "cosine":
        return (
            f"int8 vs float32: embedding cosine mean {a:.4f}, min {d['cosine_min']:.4f} over "
            f"{d['rows']} rows{limit} (on the mean)"
        )
    if d["metric"] == "order":
        return (
            f"int8 vs float32: {d['concordant']} of {d['pairs']} score pairs in the same order "
            f"({a:.2%}) over {d['rows']} rows{limit}"
        )
    return (
        f"int8 vs float32: {WHAT[d['metric']]} agree on {d['agree']} of {d['rows']} rows "
        f"({a:.2%}){limit}"
    )


def summarize(records) -> dict | None:
    """The checks of every shard record that holds one, added up (every worker's rows)."""
    total, threshold = None, None
    for r in records:
        part = r.get("int8_check")
        if part:
            total = merge(total, part)
            threshold = part.get("threshold", threshold)
    if total is not None:
        total["threshold"] = threshold
    return total


def refusal(total: dict, threshold: float) -> str:
    a, bound = agreement(total), upper_bound(total)
    if total["metric"] == "cosine":
        what = (
            f"embeddings of the int8 model have cosine {a:.4f} to float32's on average (min "
            f"{total['cosine_min']:.4f}; 95% upper bound of the mean {bound:.4f})"
        )
    elif total["metric"] == "order":
        what = (
            f"the int8 model orders {a:.2%} of score pairs as float32 does (95% upper bound "
            f"{bound:.2%})"
        )
    else:
        what = (
            f"{WHAT[total['metric']]} of the int8 model agree with float32's on {a:.2%} "
            f"(95% upper bound {bound:.2%})"
        )
    return (
        f"int8 check: {what} over the first {total['rows']} rows, below "
        f"model.int8_min_agreement = {threshold}; run with --dtype float32, or set a lower "
        "model.int8_min_agreement in the job file's [model] table"
    )


def check_int8(task, texts: list[str], ids: list[str], extra: dict, threshold: float, got=None):
    """Run this worker's next rows (up to CHECK_ROWS in all) through the float32 model as well;
    return this part of the check (None when the worker is done checking), or raise
    Int8Disagrees when the agreement so far is below `threshold` (even its 95% upper bound,
    `upper_bound`). `got`: the task's (int8) output
    for all of `texts`, compared on those rows as it will be written (recommend: its query
    vectors are run again). The float32 model is let go once CHECK_ROWS rows are checked."""
    target = getattr(task, "embedder", None) or task  # recommend: its query vectors
    loaded = getattr(target, "loaded", None)
    if loaded is None:
        return None
    state = loaded.checked
    if state.get("refused"):  # this worker's next shards refuse alike: nothing int8 is written
        raise Int8Disagrees(state["refused"])
    if loaded.reference is None or not texts:
        return None
    n = min(len(texts), CHECK_ROWS - state.get("rows_seen", 0))
    sub = (texts[:n], ids[:n], {c: v[:n] for c, v in extra.items()})
    if got is None or target is not task:
        got = target.process(*sub)
    int8 = loaded.model
    loaded.model = loaded.reference
    try:
        ref = target.process(*sub)
    finally:
        loaded.model = int8
    part = compare(sub[0], ref, got)  # the rows of `ref`: the first n
    part["threshold"] = threshold
    state["total"] = merge(state.get("total"), part)
    state["rows_seen"] = state.get("rows_seen", 0) + n
    if state["rows_seen"] >= CHECK_ROWS:
        loaded.reference = None  # checked: the float32 copy goes
    bound = upper_bound(state["total"])
    if bound is not None and bound < threshold:
        loaded.reference = None
        state["refused"] = refusal(state["total"], threshold)
        raise Int8Disagrees(state["refused"])
    part["agreement"] = agreement(part)
    return part
