"""Bulk LLM jobs as people write them: shared-prefix reuse and structured output, side by side.

    python -m bench.prompting                 # the figures in bench/RESULTS.md
    python -m bench.prompting --smoke         # a tiny size, for CI: keeps the code working

GPT-2-small-sized random weights (bench/throughput.py's), one process, the generate task itself
(`get_task(...).process`, what a worker runs on a shard). Sides alternate (A B A B ...,
--rounds rounds); the table gives the median and spread of each and their ratio.

  prefix      rows sharing a --prefix-tokens instruction prefix, each with a 20-80-token document
              of its own, a few new tokens each (prefill dominates): time to the last token with
              the prefix's KV cache computed once (reuse_prefix, the default) over prefilling
              every row whole
  json        the same documents, greedy, JSON-schema-constrained vs unconstrained: new tokens/s
              (the grammar's masks are filled in Rust for the whole batch each step)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.throughput import alternate, build_gpt2_small, spread
from fastserve.pipeline.testing import WORDS, sample_texts

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["label", "stars", "summary"],
    "additionalProperties": False,
}


def instructions(tok, tokens: int) -> str:
    """An instruction text of about `tokens` tokens."""
    words, i = [], 0
    while len(tok(" ".join(words))["input_ids"]) < tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 1
    return "Instructions: " + " ".join(words) + ". Review:"


def task_for(folder: Path, slots: int, **task):
    from fastserve.pipeline.config import ModelConfig, TaskConfig
    from fastserve.pipeline.tasks import get_task

    get_task.cache_clear()
    return get_task(
        ModelConfig(path=str(folder)), TaskConfig(name="generate", batch_size=slots, **task)
    )


def timed(task, texts: list[str]) -> tuple[float, int]:
    ids = [f"r{i}" for i in range(len(texts))]
    t0 = time.perf_counter()
    out = task.process(texts, ids, {})
    assert len(out.kept) == len(texts), out.rejected[:3]
    return time.perf_counter() - t0, sum(out.columns["generated_tokens"])


def bench_prefix(folder: Path, args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    head = instructions(tok, args.prefix_tokens)
    docs = sample_texts(args.rows, seed=5, min_words=12, max_words=50)  # about 20-80 tokens
    texts = [f"{head} {d}" for d in docs]
    tasks = {
        reuse: task_for(folder, args.slots, max_new_tokens=args.new_tokens, reuse_prefix=reuse)
        for reuse in (True, False)
    }
    for t in tasks.values():
        t.eos = set()  # every row runs to its limit: the same work on both sides

    def side(reuse: bool):
        def run() -> float:
            seconds, _ = timed(tasks[reuse], texts)
            return seconds

        return run

    rates = alternate({"reuse": side(True), "whole": side(False)}, args.rounds)
    own = [len(x) for x in tok(docs)["input_ids"]]
    return {
        "workload": f"prefix reuse: {len(texts)} rows, {len(tok(head)['input_ids'])}-token "
        f"shared prefix + {min(own)}-{max(own)}-token documents, {args.new_tokens} new tokens",
        "unit": "s to the last token (ratio: speed-up)",
        "ours": spread(rates["reuse"]),
        "base": spread(rates["whole"]) + " every row prefilled whole",
        "ratio": statistics.median(rates["whole"]) / statistics.median(rates["reuse"]),
    }


def bench_json(folder: Path, args) -> dict:
    docs = sample_texts(args.rows, seed=5, min_words=12, max_words=50)
    texts = [f"Label this review as JSON: {d}" for d in docs]
    constrained = task_for(
        folder, args.slots, max_new_tokens=args.json_tokens, json_schema=json.dumps(SCHEMA)
    )
    ids = [f"r{i}" for i in range(len(texts))]
    # the same work on both sides: each free row generates as many tokens as its constrained
    # run did (constrained rows end when their JSON is complete; free ones at their limit)
    lengths = constrained.process(texts, ids, {}).columns["generated_tokens"]
    free = task_for(folder, args.slots, max_new_tokens_column="n")
    free.eos = set()

    def side(task, extra):
        def run() -> float:
            t0 = time.perf_counter()
            out = task.process(texts, ids, extra)
            assert len(out.kept) == len(texts)
            return sum(out.columns["generated_tokens"]) / (time.perf_counter() - t0)

        return run

    rates = alternate(
        {"json": side(constrained, {}), "free": side(free, {"n": lengths})}, args.rounds
    )
    return {
        "workload": f"JSON-schema output: {len(texts)} rows, up to {args.json_tokens} new tokens",
        "unit": "new tokens/s",
        "ours": spread(rates["json"]),
        "base": spread(rates["free"]) + " unconstrained, as many tokens per row",
        "ratio": statistics.median(rates["json"]) / statistics.median(rates["free"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="prefix,json")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prefix-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--json-tokens", type=int, default=48)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.prefix_tokens, args.json_tokens, args.rounds = 12, 40, 16, 1
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_gpt2_small(Path(tmp) / "gpt2", small=args.smoke)
        benches = {"prefix": bench_prefix, "json": bench_json}
        rows = [benches[name](folder, args) for name in args.only.split(",")]
    print("| workload | unit | FastServe | baseline | ratio |")
    print("|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['unit']} | {r['ours']} | {r['base']} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
