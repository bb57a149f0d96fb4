"""The demo's data: product reviews made from templates, with known sentiment labels.

A training set (clean, labeled) and an inference corpus (several Parquet shards, a held-out
draw, with a few bad rows among them: empty, null and over-long texts). The corpus's `prompt`
column (a review's first words) is what the demo's generator continues.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PRODUCTS = [
    "blender", "kettle", "backpack", "headphones", "desk lamp", "phone case", "coffee grinder",
    "running shoes", "keyboard", "water bottle", "rain jacket", "toaster", "office chair",
    "camera bag", "yoga mat", "air fryer", "monitor stand", "hiking boots", "tent", "speaker",
]  # fmt: skip
GOOD = [
    "works perfectly", "is excellent value", "exceeded my expectations", "feels solid and well made",
    "is the best purchase I made this year", "arrived early and works great", "is comfortable and sturdy",
    "does exactly what it promises", "is beautifully designed", "is quiet and fast",
]  # fmt: skip
BAD = [
    "broke after two days", "is a waste of money", "stopped working within a week",
    "feels cheap and flimsy", "arrived damaged", "is far too loud", "is uncomfortable to use",
    "does not do what it promises", "leaks everywhere", "was returned the same day",
]  # fmt: skip
OPENERS = ["Honestly,", "Overall", "After a month,", "I think", "To be fair,", "In short,", ""]
GOOD_END = ["Highly recommended.", "Would buy again.", "Five stars.", "Love it.", "Great gift."]
BAD_END = ["Avoid it.", "Very disappointed.", "One star.", "Do not buy.", "Save your money."]
DETAILS = [
    "The packaging was fine.", "Shipping took four days.", "The colour matches the photos.",
    "I use it every morning.", "My partner uses it too.", "The manual is short.", "",
]  # fmt: skip


def review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    good = label == "positive"
    parts = [
        rng.choice(OPENERS),
        f"the {rng.choice(PRODUCTS)} {rng.choice(GOOD if good else BAD)}.",
        rng.choice(DETAILS),
        rng.choice(GOOD_END if good else BAD_END),
    ]
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:], label


def write_train(folder: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    texts, labels = zip(*(review(rng) for _ in range(rows)), strict=True)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"id": [f"t{i}" for i in range(rows)], "text": list(texts), "true_label": list(labels)}
    )
    pq.write_table(table, folder / "train.parquet")


def write_corpus(folder: Path, rows: int, shards: int, seed: int = 2) -> int:
    """`rows` reviews over `shards` files, plus bad rows in the first file; returns bad rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    bad = 0
    for s in range(shards):
        n = min(per, rows - s * per)
        texts, labels = (list(x) for x in zip(*(review(rng) for _ in range(n)), strict=True))
        ids = [f"r{s:02d}-{i:05d}" for i in range(n)]
        if s == 0:  # the rows a real corpus always has: kept aside with a reason, never lost
            extra = ["", None, "   ", " ".join(["This review goes on and on."] * 120)]
            texts += extra
            labels += [None] * len(extra)
            ids += [f"bad-{i}" for i in range(len(extra))]
            bad = len(extra)
        # the generator continues the first words of each review
        prompts = [
            t if t is None or len(t.split()) > 40 else " ".join(t.split()[:3]) for t in texts
        ]
        pq.write_table(
            pa.table({"id": ids, "text": texts, "prompt": prompts, "true_label": labels}),
            folder / f"reviews-{s:02d}.parquet",
        )
    return bad


def write_queries(folder: Path, corpus: Path, n: int = 5) -> None:
    """The recommend step's queries: the first `n` reviews of the corpus, each with itself as the
    one item it must not be given (`self`, a list of ids)."""
    if folder.exists():
        return
    first = sorted(corpus.glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(first, columns=["id", "text"]).to_pylist() if r["text"]]
    rows = [r for r in rows if len(r["text"].split()) < 40][:n]
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"like-{r['id']}" for r in rows],
                "text": [r["text"] for r in rows],
                "self": [[r["id"]] for r in rows],
            }
        ),
        folder / "queries.parquet",
    )


QUESTION = "Which product is this review about?"


def product_span(text: str) -> tuple[int, int] | None:
    """Where the review names its product ("the kettle ..."): the span the QA step answers."""
    for product in sorted(PRODUCTS, key=len, reverse=True):
        at = text.lower().find(f"the {product} ")
        if at >= 0:
            return at + 4, at + 4 + len(product)
    return None


def qa_examples(rows: int, seed: int = 5) -> list[tuple[str, int, int, str]]:
    """(question, start, end, review) to fit the demo's QA head on: which product?"""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        text, _ = review(rng)
        start, end = product_span(text)
        out.append((QUESTION, start, end, text))
    return out
