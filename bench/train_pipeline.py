"""Pipeline micro-batches against the bubble model, and data-parallel scaling, on real ranks.

    python -m bench.train_pipeline                 # full size (a few minutes on 2 cores)
    python -m bench.train_pipeline --smoke         # tiny, to keep the code working (CI)

Each configuration runs `fastserve train` under `mpiexec` (1 torch thread per rank), alternated
over rounds (A B C … A B C …); tokens/s is the median over steps after warm-up, then over rounds.
The table compares the speed-up over one rank with the bubble model's prediction:
PP with p stages and m micro-batches can reach at most p x (1 - (p-1)/(m+p-1)).
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


def job_text(out: str, size: dict, parallel: dict, steps: int) -> str:
    par = "".join(f"{k} = {json.dumps(v)}\n" for k, v in parallel.items())
    return (
        f'[model]\narch = "gpt"\nn_layer = {size["layers"]}\nn_head = 4\nn_embd = {size["width"]}\nblock_size = {size["seq"]}\n'
        f'[data]\npaths = ["corpus"]\nvocab_size = 512\nseq_len = {size["seq"]}\n'
        f"[train]\nsteps = {steps}\nbatch_size = {size['batch']}\neval_every = 0\neval_batches = 1\npeak_tflops = 1.0\n"
        f'[parallel]\n{par}timeout_s = 300\n[output]\npath = "{out}"\n'
    )


def run(workdir: Path, name: str, ranks: int, size: dict, parallel: dict, steps: int) -> float:
    cfg = workdir / f"{name}.toml"
    out = workdir / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg.write_text(job_text(name, size, parallel, steps))
    cmd = [sys.executable, "-m", "fastserve.jobs", "train", "--config", str(cfg)]
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rates = [
        json.loads(x)["tokens_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    return statistics.median(rates[2:] if len(rates) > 3 else rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = (
        {"layers": 2, "width": 32, "seq": 32, "batch": 8}
        if args.smoke
        else {"layers": 8, "width": 256, "seq": 128, "batch": 32}
    )
    steps = 4 if args.smoke else 8
    configs = {
        "1 rank": (1, {}),
        "PP2 m=1": (2, {"pp": 2, "microbatches": 1, "schedule": "GPipe"}),
        "PP2 m=4": (2, {"pp": 2, "microbatches": 4, "schedule": "1F1B"}),
        "PP2 m=8": (2, {"pp": 2, "microbatches": 8, "schedule": "1F1B"}),
        "DP2": (2, {"dp": 2}),
    }
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_corpus(workdir / "corpus", n_files=2, rows=300 if args.smoke else 3000)
        rates: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(rounds):
            for name, (ranks, par) in configs.items():
                rates[name].append(
                    run(workdir, name.replace(" ", "_").replace("=", ""), ranks, size, par, steps)
                )
    base = statistics.median(rates["1 rank"])
    print(f"{'config':<10} {'tokens/s':>10} {'speed-up':>9} {'bubble model':>13} {'model max':>10}")
    for name, (ranks, par) in configs.items():
        r = statistics.median(rates[name])
        if "pp" in par:
            m = par["microbatches"]
            bubble = 1 / (m + 1)
            model = f"{bubble:.0%}"
            ceiling = f"{2 * (1 - bubble):.2f}x"
        else:
            model, ceiling = "-", f"{ranks:.2f}x"
        print(f"{name:<10} {r:>10.0f} {r / base:>8.2f}x {model:>13} {ceiling:>10}")


if __name__ == "__main__":
    main()
