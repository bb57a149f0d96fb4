"""Pipeline micro-batches against the bubble model, and data-parallel scaling, on real ranks; then
fine-tuning a Llama-family model initialised from a Hugging Face folder: its pipeline speed-up,
and the bytes each rank reads when it loads the folder.

    python -m bench.train_pipeline                 # full size (a few minutes on 2 cores)
    python -m bench.train_pipeline --smoke         # tiny, to keep the code working (CI)
    python -m bench.train_pipeline --parts llama,load

Each configuration runs `fastserve train` under `mpiexec` (1 torch thread per rank), alternated
over rounds (A B C … A B C …); tokens/s is the median over steps after warm-up, then over rounds.
The tables compare the speed-up over one rank with the bubble model's prediction:
PP with p stages and m micro-batches can reach at most p x (1 - (p-1)/(m+p-1)).

Parts: `gpt` (FastServe's GPT from scratch: PP2 at 1/4/8 micro-batches, DP2), `llama` (a Llama
folder with grouped-query attention, built here with transformers and saved in several
safetensors shards with model.safetensors.index.json: 1 rank against PP2 at 1 and 8
micro-batches), `load` (that folder loaded by the trainer at 1 rank, PP2, TP2 and PP2xTP2: the
bytes each rank reads against its share, the bytes of the tensors and slices it holds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fastserve.pipeline.testing import write_corpus

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gpt", "llama", "load")


def job_text(out: str, size: dict, parallel: dict, steps: int, init_from: str = "") -> str:
    par = "".join(f"{k} = {json.dumps(v)}\n" for k, v in parallel.items())
    if init_from:  # the folder says the model's sizes and its tokenizer
        model = f'[model]\ninit_from = "{init_from}"\n'
        data = f'[data]\npaths = ["corpus"]\nseq_len = {size["seq"]}\n'
    else:
        model = f'[model]\narch = "gpt"\nn_layer = {size["layers"]}\nn_head = 4\nn_embd = {size["width"]}\nblock_size = {size["seq"]}\n'
        data = f'[data]\npaths = ["corpus"]\nvocab_size = 512\nseq_len = {size["seq"]}\n'
    return (
        f"{model}{data}"
        f"[train]\nsteps = {steps}\nbatch_size = {size['batch']}\neval_every = 0\neval_batches = 1\npeak_tflops = 1.0\n"
        f'[parallel]\n{par}timeout_s = 300\n[output]\npath = "{out}"\n'
    )


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _launch(workdir: Path, name: str, ranks: int, cmd: list[str]) -> None:
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    proc = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=1800
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")


def run(
    workdir: Path, name: str, ranks: int, size: dict, parallel: dict, steps: int, init_from=""
) -> float:
    cfg = workdir / f"{name}.toml"
    out = workdir / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg.write_text(job_text(name, size, parallel, steps, init_from))
    _launch(
        workdir,
        name,
        ranks,
        [sys.executable, "-m", "fastserve.jobs", "train", "--config", str(cfg)],
    )
    rates = [
        json.loads(x)["tokens_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    return statistics.median(rates[2:] if len(rates) > 3 else rates)


def bubble_ceiling(p: int, m: int) -> float:
    """The bubble model's best speed-up of p stages over one rank: p x (1 - (p-1)/(m+p-1))."""
    return p * (1 - (p - 1) / (m + p - 1))


def timed_table(workdir: Path, configs: dict, size: dict, steps: int, rounds: int, init_from=""):
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (ranks, par) in configs.items():
            tag = name.replace(" ", "_").replace("=", "")
            rates[name].append(run(workdir, tag, ranks, size, par, steps, init_from))
    base = statistics.median(rates["1 rank"])
    print(
        f"{'config':<10} {'tokens/s':>10} {'speed-up':>9} {'bubble':>7} {'model max':>10} "
        f"{'of max':>7}  rounds (tokens/s)"
    )
    for name, (ranks, par) in configs.items():
        r = statistics.median(rates[name])
        if "pp" in par:
            p, m = par["pp"], par["microbatches"]
            bubble, ceiling = f"{(p - 1) / (m + p - 1):.0%}", bubble_ceiling(p, m)
        else:
            bubble, ceiling = "-", float(ranks)
        print(
            f"{name:<10} {r:>10.0f} {r / base:>8.2f}x {bubble:>7} {ceiling:>9.2f}x "
            f"{r / base / ceiling:>7.0%}  {' '.join(f'{x:.0f}' for x in rates[name])}"
        )
    return {k: statistics.median(v) / base for k, v in rates.items()}


# -- a Llama-family folder, built offline ------------------------------------------------------


def build_llama_folder(folder: Path, size: dict) -> Path:
    """A Llama folder as transformers saves one: grouped-query attention, an untied head (PP
    splits it from the embedding), a byte-level BPE tokenizer, weights in several safetensors
    shards listed by model.safetensors.index.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastserve.pipeline.testing.models import build_bpe_tokenizer

    tok = build_bpe_tokenizer(folder, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size["width"],
        intermediate_size=size["mlp"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=2 * size["seq"],
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size=size["shard"])
    return folder


# -- bytes read per rank while the trainer loads the folder ------------------------------------


def load_worker(out: str, config: str) -> None:
    """Under mpiexec: build the real Trainer on the job (its _build loads the folder), then
    gather every rank's bytes read and bytes held; rank 0 writes them to `out`."""
    import torch

    torch.set_num_threads(1)
    from fastserve.pipeline.distributed.bootstrap import bootstrap, shutdown
    from fastserve.pipeline.models import hf_format
    from fastserve.pipeline.training.config import load_train_job
    from fastserve.pipeline.training.trainer import Trainer

    job = load_train_job(config, {})
    env = bootstrap(timeout_s=job.parallel.timeout_s)
    trainer = Trainer(job, env)
    mine = {
        "rank": env.rank,
        "pp": trainer.pp_rank,
        "tp": trainer.tp_rank,
        "read": hf_format.READ["bytes"],
        "held": sum(hf_format.held_bytes(c, job.model.init_from) for c in trainer.chunks),
    }
    everyone = env.comm.gather(mine)
    if env.rank == 0:
        Path(out).write_text(json.dumps(everyone))
    shutdown(env)


def load_table(workdir: Path, folder: str, size: dict) -> float:
    """Each layout's ranks: bytes read against their share. Returns the worst read/share."""
    total = sum(p.stat().st_size for p in (workdir / folder).glob("*.safetensors"))
    shards = len(list((workdir / folder).glob("*.safetensors")))
    layouts = {
        "1 rank": (1, {}),
        "PP2": (2, {"pp": 2}),
        "TP2": (2, {"tp": 2}),
        "PP2xTP2": (4, {"pp": 2, "tp": 2}),
    }
    print(f"\n{folder}: {shards} safetensors shards, {total / 2**20:.1f} MiB")
    print(
        f"{'layout':<9} {'rank':>4} {'stage':>5} {'tp':>3} {'read MiB':>9} {'share MiB':>9} "
        f"{'read/share':>10} {'1/n of all':>10}"
    )
    worst = 0.0
    for name, (ranks, par) in layouts.items():
        tag = "load_" + name.replace(" ", "_")
        cfg = workdir / f"{tag}.toml"
        cfg.write_text(job_text(tag, size, {**par, "microbatches": 2}, 1, folder))
        out = workdir / f"{tag}.json"
        cmd = [sys.executable, "-m", "bench.train_pipeline", "--load-worker", str(out), str(cfg)]
        _launch(workdir, tag, ranks, cmd)
        for r in json.loads(out.read_text()):
            ratio = r["read"] / r["held"]
            worst = max(worst, ratio)
            print(
                f"{name:<9} {r['rank']:>4} {r['pp']:>5} {r['tp']:>3} {r['read'] / 2**20:>9.2f} "
                f"{r['held'] / 2**20:>9.2f} {ratio:>9.2f}x {total / ranks / 2**20:>10.2f}"
            )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: gpt, llama, load")
    ap.add_argument("--load-worker", nargs=2, metavar=("OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_worker:
        load_worker(*args.load_worker)
        return
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {PARTS}")
    size = (
        {"layers": 2, "width": 32, "seq": 32, "batch": 8}
        if args.smoke
        else {"layers": 8, "width": 256, "seq": 128, "batch": 32}
    )
    llama = (
        {"layers": 4, "width": 32, "mlp": 64, "heads": 4, "kv_heads": 2, "seq": 32, "batch": 8,
         "shard": "40KB"}
        if args.smoke
        else {"layers": 8, "width": 256, "mlp": 688, "heads": 8, "kv_heads": 4, "seq": 128,
              "batch": 32, "shard": "4MB"}
    )  # fmt: skip
    steps = 4 if args.smoke else 8
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_corpus(workdir / "corpus", n_files=2, rows=300 if args.smoke else 3000)
        if "gpt" in parts:
            print("GPT from scratch")
            timed_table(workdir, {
                "1 rank": (1, {}),
                "PP2 m=1": (2, {"pp": 2, "microbatches": 1, "schedule": "GPipe"}),
                "PP2 m=4": (2, {"pp": 2, "microbatches": 4, "schedule": "1F1B"}),
                "PP2 m=8": (2, {"pp": 2, "microbatches": 8, "schedule": "1F1B"}),
                "DP2": (2, {"dp": 2}),
            }, size, steps, rounds)  # fmt: skip
        if parts & {"llama", "load"}:
            build_llama_folder(workdir / "llama", llama)
        if "llama" in parts:
            print(
                f"\nLlama from a Hugging Face folder ({llama['layers']} layers x {llama['width']}, "
                f"{llama['heads']} heads / {llama['kv_heads']} kv heads, MLP {llama['mlp']})"
            )
            speedup = timed_table(workdir, {
                "1 rank": (1, {}),
                "PP2 m=1": (2, {"pp": 2, "microbatches": 1, "schedule": "GPipe"}),
                "PP2 m=8": (2, {"pp": 2, "microbatches": 8, "schedule": "1F1B"}),
            }, llama, steps, rounds, init_from="llama")  # fmt: skip
            share = speedup["PP2 m=8"] / bubble_ceiling(2, 8)
            print(
                f"Llama PP2 m=8: {speedup['PP2 m=8']:.2f}x = {share:.0%} of the bubble model's "
                f"{bubble_ceiling(2, 8):.2f}x (target: within 15%, >= 85%)"
            )
        if "load" in parts:
            worst = load_table(workdir, "llama", llama)
            print(f"worst read/share over ranks: {worst:.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
