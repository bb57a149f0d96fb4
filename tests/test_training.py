"""Training over real MPI ranks (mpiexec from the mpich wheel), tiny models, CPU/gloo.

Every parallel layout must give the losses of single-process training, step by step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fastserve.pipeline.testing import infer_args, write_corpus

from conftest import read_sorted, run_cli, wait_for

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(
    not MPIEXEC.exists(), reason="mpiexec (the mpich wheel) is not installed"
)

BASE = {
    "model": {"arch": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 32, "block_size": 64},
    "data": {"paths": ["corpus"], "vocab_size": 320, "seq_len": 32},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "grad_clip": 0.5,
    },
    "parallel": {"microbatches": 2, "timeout_s": 20},
}


def toml(tables: dict) -> str:
    def v(x):
        if isinstance(x, bool):
            return str(x).lower()
        if isinstance(x, str):
            return json.dumps(x)
        if isinstance(x, list):
            return "[" + ", ".join(v(i) for i in x) + "]"
        return repr(x)

    return "".join(
        f"[{t}]\n" + "".join(f"{k} = {v(x)}\n" for k, x in kv.items()) for t, kv in tables.items()
    )


def job(tmp, name, **changes) -> Path:
    tables = {k: dict(v) for k, v in BASE.items()}
    for table, kv in changes.items():
        tables.setdefault(table, {}).update(kv)
    tables["output"] = {"path": name}
    p = tmp / f"{name}.toml"
    p.write_text(toml(tables))
    return p


def train(
    config: Path, n: int = 1, timeout: float = 240, env=None, fault: str = ""
) -> subprocess.CompletedProcess:
    """`fastserve train` on `n` ranks; `fault`: RANK:STEP:KIND (fastserve.pipeline.testing.faults)."""
    main = ["fastserve.pipeline.testing.faults", fault] if fault else ["fastserve.jobs"]
    cmd = [sys.executable, "-m", *main, "train", "--config", str(config)]
    if n > 1:
        cmd = [str(MPIEXEC), "-n", str(n), *cmd]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
        cwd=config.parent,
    )


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_corpus(d / "corpus", n_files=2, rows=300)
    return d


@pytest.fixture(scope="module")
def reference(workdir):
    proc = train(job(workdir, "single"))
    assert proc.returncode == 0, proc.stderr
    return losses(workdir / "single")


LAYOUTS = {
    "dp2": (2, {"dp": 2}),
    "pp2-gpipe": (2, {"pp": 2, "schedule": "GPipe"}),
    "pp2-1f1b": (2, {"pp": 2, "schedule": "1F1B"}),
    "pp2-interleaved": (2, {"pp": 2, "schedule": "Interleaved1F1B", "stages_per_rank": 2}),
    "tp2": (2, {"tp": 2}),
    "pp2xdp2": (4, {"pp": 2, "dp": 2, "schedule": "1F1B"}),
    "pp2xtp2": (4, {"pp": 2, "tp": 2, "schedule": "1F1B"}),
    # two passes of 4 rows each: torch's schedule once rescaled the earlier pass's gradients too
    "pp2-accum2": (2, {"pp": 2, "schedule": "1F1B"}, {"grad_accum": 2}),
}


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_losses_equal_single_process(workdir, reference, name):
    n, parallel, *loop = LAYOUTS[name]
    loop_changes = {"train": {**BASE["train"], **loop[0]}} if loop else {}
    proc = train(job(workdir, name, parallel=parallel, **loop_changes), n=n)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(workdir / name)
    assert len(got) == len(reference) == 6
    assert got == pytest.approx(reference, abs=1e-5)
    assert reference[-1] < reference[0]  # it learns


@pytest.mark.mpi
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(workdir):
    steps = {"train": {**BASE["train"], "steps": 400, "lr": 1e-3}}
    full = train(job(workdir, "long-ref", parallel={"pp": 2}, **steps), n=2, timeout=400)
    assert full.returncode == 0, full.stderr[-2000:]
    cfg = job(workdir, "long", parallel={"pp": 2}, **steps)
    run = workdir / "long"
    proc = subprocess.Popen(
        [
            str(MPIEXEC),
            "-n",
            "2",
            sys.executable,
            "-m",
            "fastserve.jobs",
            "train",
            "--config",
            str(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=workdir,
    )
    wait_for(
        lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 20,
        timeout=120,
        what="20 steps",
    )
    ranks = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name().lower()
    ]
    assert len(ranks) == 2
    for r in ranks:  # what Slurm does before a time limit: signal every task
        r.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped_at = len(losses(run))
    assert (
        stopped_at < 400 and (run / "checkpoints" / f"step-{stopped_at:06d}" / "COMPLETE").exists()
    )
    resumed = train(cfg, n=2, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(resumed)" in resumed.stderr
    assert losses(run) == pytest.approx(losses(workdir / "long-ref"), abs=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["raise", "hang"])
def test_a_failing_rank_ends_the_job_quickly_with_its_traceback(workdir, kind):
    t0 = time.monotonic()
    proc = train(
        job(
            workdir,
            f"fault-{kind}",
            parallel={"pp": 2, "timeout_s": 10},
            train={**BASE["train"], "steps": 50},
        ),
        n=2,
        timeout=120,
        fault=f"1:3:{kind}",
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 45, f"the job took {elapsed:.0f}s to end"
    if kind == "raise":
        assert "injected fault on rank 1 at step 3" in proc.stderr and "Traceback" in proc.stderr
    else:  # the other rank's collective times out, and that rank's traceback ends the job
        assert "aborting the job" in proc.stderr


@pytest.mark.mpi
def test_lstm_learns_and_export_serves_generate(workdir):
    cfg = job(
        workdir,
        "lstm",
        model={"arch": "lstm", "n_layer": 2, "n_embd": 32, "block_size": 64},
        train={**BASE["train"], "steps": 30, "lr": 1e-2},
        parallel={"pp": 2},
    )
    proc = train(cfg, n=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = losses(workdir / "lstm")
    assert got[-1] < got[0] - 0.5
    export = workdir / "lstm" / "export"
    assert json.loads((export / "fastserve.json").read_text())["arch"] == "lstm"
    prompts = workdir / "prompts"
    write_corpus(prompts, n_files=1, rows=6, prefix="p")
    run_cli(
        *infer_args(export, workdir / "gen", prompts, task="generate"),
        "--config",
        _gen_toml(workdir),
        check=True,
    )
    out = read_sorted(workdir / "gen")
    assert out.num_rows == 6 and all(n <= 8 for n in out.column("generated_tokens").to_pylist())


def test_gpt_export_round_trip_into_infer(workdir, reference):
    export = workdir / "single" / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    prompts = workdir / "prompts-gpt"
    write_corpus(prompts, n_files=1, rows=4, prefix="g")
    run_cli(
        *infer_args(export, workdir / "gen-gpt", prompts, task="generate"),
        "--config",
        _gen_toml(workdir),
        check=True,
    )
    assert read_sorted(workdir / "gen-gpt").num_rows == 4


def test_dry_run_prints_the_plan_and_bad_layouts_say_why(workdir):
    proc = run_cli(
        "train",
        "--config",
        job(workdir, "plan", parallel={"pp": 2, "dp": 2, "tp": 2}),
        "--dry-run",
        check=True,
    )
    assert (
        "world size 8 = dp 2 x tp 2 x pp 2" in proc.stdout
        and "stage 1 (pp rank 1): layers 2-3" in proc.stdout
    )
    bad = run_cli("train", "--config", job(workdir, "bad", parallel={"tp": 3}), "--dry-run")
    assert bad.returncode == 2 and "model.n_head (4) must divide by parallel.tp (3)" in bad.stderr
    ddp = run_cli(
        "train",
        "--config",
        job(workdir, "ddp", parallel={"pp": 2, "dp": 2, "dp_mode": "ddp", "schedule": "GPipe"}),
        "--dry-run",
    )
    assert ddp.returncode == 2 and "DDP inside a pipeline" in ddp.stderr


@pytest.mark.mpi
def test_world_size_mismatch_names_the_degrees(workdir):
    proc = train(job(workdir, "mismatch", parallel={"pp": 2}), n=1)
    assert proc.returncode != 0
    assert "dp(1) * tp(1) * pp(2) = 2 != WORLD_SIZE(1)" in proc.stderr


def _gen_toml(workdir):
    p = workdir / "gen.toml"
    p.write_text("[task]\nmax_new_tokens = 8\n")
    return p


API_SCRIPT = """
import json, sys
from fastserve.pipeline.testing import infer_args, write_corpus
from fastserve.pipeline.training.api import DistributedModel
from fastserve.pipeline.models.gpt import GPT, GPTConfig
import torch
torch.manual_seed(0)
# bias=False: what the job's [model] table cannot say; the export must follow the model
dm = DistributedModel(GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=False)), strategy=sys.argv[1])
hist = dm.fit("corpus", steps=4, batch_size=8, seq_len=32, output=sys.argv[2], lr=3e-3, warmup_steps=1, eval_every=0)
text = dm.generate(["the movie was", "bad"], max_new_tokens=5)
if dm.env.rank == 0:
    print(json.dumps({"losses": [h["loss"] for h in hist], "text": text}))
"""


@pytest.mark.mpi
def test_python_api_pipeline_equals_single_process(workdir):
    def run(n, strategy, out):
        cmd = [sys.executable, "-c", API_SCRIPT, strategy, out]
        if n > 1:
            cmd = [str(MPIEXEC), "-n", str(n), *cmd]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=workdir
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    single = run(1, "data_parallel", "api-single")
    piped = run(2, "pipeline", "api-pp")
    assert piped["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert piped["text"] == single["text"] and len(single["text"]) == 2


@pytest.mark.mpi
def test_classifier_pipeline_equals_single_learns_and_serves_sentiment(workdir):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = {
        "positive": ["great", "loved", "wonderful"],
        "negative": ["terrible", "awful", "broken"],
    }
    rows = []
    for i in range(400):
        label = rng.choice(sorted(words))
        text = " ".join(
            rng.choices(["the", "product", "was", "really", "it"], k=4) + [rng.choice(words[label])]
        )
        rows.append((f"c{i}", text, label))
    (workdir / "labeled").mkdir(exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "text": [r[1] for r in rows],
                "label": [r[2] for r in rows],
            }
        ),
        workdir / "labeled" / "a.parquet",
    )
    changes = dict(
        model={"arch": "classifier", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        data={"paths": ["labeled"], "label_column": "label", "vocab_size": 400, "seq_len": 32},
        train={**BASE["train"], "steps": 60, "eval_every": 30},
    )
    single = train(job(workdir, "clf-single", **changes))
    assert single.returncode == 0, single.stderr[-2000:]
    piped = train(job(workdir, "clf-pp", parallel={"pp": 2}, **changes), n=2)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert losses(workdir / "clf-pp") == pytest.approx(losses(workdir / "clf-single"), abs=1e-5)
    last = json.loads((workdir / "clf-pp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_accuracy"] > 0.9
    # the export serves `infer --task sentiment`, with the corpus's own labels
    run_cli(
        *infer_args(workdir / "clf-pp" / "export", workdir / "clf-out", workdir / "labeled"),
        check=True,
    )
    out = read_sorted(workdir / "clf-out")
    truth = {r[0]: r[2] for r in rows}
    hits = sum(
        truth[i] == lab
        for i, lab in zip(
            out.column("id").to_pylist(), out.column("label").to_pylist(), strict=True
        )
    )
    assert hits / len(rows) > 0.9


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from fastserve.pipeline.training.trainer import trim_metrics

    path = tmp_path / "metrics.jsonl"
    steps = [1, 2, 3, 4, 5]  # checkpoint at 3; steps 4-5 done, then the node was lost
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in steps) + '{"st')
    trim_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}')  # whole, but its newline lost
    trim_metrics(path, 3)
    with open(path, "a") as f:
        f.write('{"step": 4}\n')
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    trim_metrics(path, 0)  # no checkpoint: the rerun starts over
    assert path.read_text() == ""


@pytest.mark.mpi
def test_every_rank_killed_while_a_checkpoint_is_written_resumes_from_the_one_before(workdir):
    more = {"train": {**BASE["train"], "steps": 12}, "checkpoint": {"every": 4}}
    full = train(job(workdir, "ckpt-ref", parallel={"pp": 2}, **more), n=2)
    assert full.returncode == 0, full.stderr[-2000:]
    cfg = job(workdir, "ckpt-kill", parallel={"pp": 2}, **more)
    killed = train(cfg, n=2, fault="0:8:kill-in-save")
    assert killed.returncode != 0
    run = workdir / "ckpt-kill"
    assert (run / "checkpoints" / "step-000004" / "COMPLETE").exists()
    assert not (run / "checkpoints" / "step-000008" / "COMPLETE").exists()  # cut short
    resumed = train(cfg, n=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 4 -> 12 (resumed)" in resumed.stderr
    assert losses(run) == pytest.approx(losses(workdir / "ckpt-ref"), abs=1e-5)
    status = run_cli("status", run, check=True).stdout
    assert "steps        12 of 12 done" in status and "step-000012" in status
    assert "complete: exported" in status


@pytest.mark.mpi
def test_a_data_error_on_rank_0_ends_every_rank_with_one_message(workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (workdir / "ints").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), workdir / "ints" / "x.parquet")
    cfg = job(workdir, "ints-run", data={**BASE["data"], "paths": ["ints"]}, parallel={"pp": 2})
    t0 = time.monotonic()
    proc = train(cfg, n=2, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60  # not held until a time limit
    assert proc.stderr.count("column 'text' is int64; expected a string column") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    dry = run_cli("train", "--config", cfg, "--dry-run", cwd=workdir)  # said before any rank starts
    assert dry.returncode == 2 and "column 'text' is int64" in dry.stderr, dry.stderr


def test_user_mistakes_in_a_training_job_are_one_line(workdir):
    (workdir / "a-file").write_text("x")
    cfg = job(workdir, "a-file")
    proc = run_cli("train", "--config", cfg, cwd=workdir)
    assert proc.returncode == 2 and "a-file' is a file; expected a run folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    dry = run_cli("train", "--config", job(workdir, "fresh"), "--dry-run", cwd=workdir, check=True)
    assert "corpus: 2 files, 600 rows (text column 'text')" in dry.stdout
    assert "fresh (new)" in dry.stdout


@pytest.mark.mpi
def test_the_token_cache_follows_its_corpus(workdir):
    cfg = job(workdir, "cache", train={**BASE["train"], "steps": 2})
    assert train(cfg).returncode == 0
    first_tokenizer = (workdir / "cache" / "tokenizer.json").read_text()
    other = job(workdir, "cache", data={**BASE["data"], "vocab_size": 400})
    proc = train(other)  # checkpoints of the old vocabulary: refused, not silently mixed
    assert proc.returncode == 2, proc.stderr
    assert "vocab_size changed since" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(workdir / "cache" / "checkpoints")
    proc = train(other)  # nothing trained on it yet: rebuilt, with a word about it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "changed since the token cache was made: rebuilding it" in proc.stderr
    assert json.loads((workdir / "cache" / "data" / "source.json").read_text())["vocab_size"] == 400
    # a tokenizer given by path is known by its content: rewritten in place, it is news
    given = workdir / "given-tokenizer.json"
    given.write_text(first_tokenizer)
    cfg = job(workdir, "cache-given", data={**BASE["data"], "tokenizer": str(given)},
              train={**BASE["train"], "steps": 2})  # fmt: skip
    assert train(cfg).returncode == 0
    given.write_text((workdir / "cache" / "tokenizer.json").read_text())
    proc = train(cfg)
    assert proc.returncode == 2 and "tokenizer_sha256 changed since" in proc.stderr, proc.stderr


def test_weight_decay_spares_biases_norms_and_embeddings():
    from fastserve.pipeline.models.gpt import GPT, GPTConfig
    from fastserve.pipeline.training.config import TrainLoopConfig
    from fastserve.pipeline.training.optim import build_optimizer

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = build_optimizer(list(model.named_parameters()), TrainLoopConfig(weight_decay=0.1))
    names = {id(q): n for n, q in model.named_parameters()}
    decayed, spared = ({names[id(q)] for q in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert "layers.0.attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert {
        "wte.weight",
        "wpe.weight",
        "layers.0.ln_1.weight",
        "layers.0.attn.q_proj.bias",
    } <= spared
    assert not decayed & spared and len(decayed | spared) == len(names)


# The founding description's own example: a Keras-style next-word model (Embedding, two LSTM
# layers, Dense) fit on padded sequences and labels, predicting probabilities per row.
KERAS_SCRIPT = """
import json, sys
import numpy as np
import torch
from fastserve.pipeline.training.api import DistributedModel
from fastserve.pipeline.models.lstm import LSTMConfig, LSTMLM

sentences = ["the cat sat on the mat", "a dog ran in the park", "my bird sang at dawn",
             "our fish swam past rocks"]
vocab = {w: i + 1 for i, w in enumerate(sorted({w for s in sentences for w in s.split()}))}
sequences, labels = [], []
for s in sentences:
    ids = [vocab[w] for w in s.split()]
    for i in range(1, len(ids)):
        sequences.append([0] * (5 - i) + ids[:i])   # pre-padded, as Keras pads
        labels.append(ids[i])
padded_sequences, labels = np.array(sequences), np.array(labels)
torch.manual_seed(0)
model = LSTMLM(LSTMConfig(vocab_size=len(vocab) + 1, n_layer=2, n_embd=32, block_size=8))
distributed_model = DistributedModel(model, strategy=sys.argv[1])
distributed_model.fit(padded_sequences, labels, epochs=150, batch_size=8, lr=2e-2, warmup_steps=5)
predictions = distributed_model.predict(padded_sequences)
scores = distributed_model.evaluate(padded_sequences, labels)
# a batch of another shape than fit's (the pipeline's stages learned fit's shapes)
few = distributed_model.predict(padded_sequences[:3])
refusals = []
for bad in (np.full((2, 5), 999), np.zeros((0, 5), dtype=int), [[1, 2], [3]]):
    try:  # refused on every rank before any collective: the pipeline goes on working
        distributed_model.predict(bad)
    except ValueError as e:
        refusals.append(str(e))
try:
    distributed_model.fit(padded_sequences, labels[:3], epochs=1, batch_size=8)
except ValueError as e:  # a refused fit keeps the trained model
    refusals.append(str(e))
assert np.allclose(distributed_model.predict(padded_sequences[:3]), few)
# fit again goes on from the trained weights; a second model in the same process trains too
distributed_model.fit(padded_sequences, labels, epochs=5, batch_size=8, lr=1e-3)
again = distributed_model.predict(padded_sequences)
other = DistributedModel(LSTMLM(LSTMConfig(vocab_size=len(vocab) + 1, n_layer=2, n_embd=32,
                                           block_size=8)), strategy=sys.argv[1])
other_losses = [m["loss"] for m in other.fit(padded_sequences, labels, epochs=3, batch_size=8)]
if distributed_model.env.rank == 0:
    print(json.dumps({"next": [int(np.argmax(predictions[i])) for i in range(len(labels))],
                      "labels": labels.tolist(), "sums": predictions.sum(axis=1).tolist(),
                      "scores": scores, "few": few.tolist(), "first": predictions[:3].tolist(),
                      "again": [int(np.argmax(p)) for p in again], "refusals": refusals,
                      "other_losses": other_losses}))
"""


@pytest.mark.mpi
@pytest.mark.parametrize("strategy, n", [("multi_gpu", 2), ("pipeline", 2)])
def test_the_founding_descriptions_example_predicts_the_next_word(workdir, strategy, n):
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-c", KERAS_SCRIPT, strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["next"] == out["labels"]  # every next word it was trained on
    assert out["sums"] == pytest.approx([1.0] * len(out["labels"]), abs=1e-5)
    assert out["scores"]["accuracy"] == 1.0 and out["scores"]["rows_per_s"] > 0
    import numpy as np

    np.testing.assert_allclose(out["few"], out["first"], atol=1e-6)
    assert out["again"] == out["labels"]  # trained on, not started over
    assert [r.split(";")[0].split(":")[0] for r in out["refusals"]] == [
        "x holds token id 999 (row 0)",
        "x has shape (0, 5)",
        "x's rows differ in length (1 to 2 tokens",
        "x has 18 rows but y has 3",
    ], out["refusals"]
    assert len(out["other_losses"]) == 9 and all(x == x for x in out["other_losses"])


# (saved at, ranks) -> (resumed at, ranks): DCP checkpoints resume at any layout
RELAYOUTS = {
    "pp2xdp2-to-tp2": ((4, {"pp": 2, "dp": 2}), (2, {"tp": 2})),
    "pp2xtp2-to-one": ((4, {"pp": 2, "tp": 2}), (1, {})),
    "one-to-pp2-interleaved": (
        (1, {}),
        (2, {"pp": 2, "schedule": "Interleaved1F1B", "stages_per_rank": 2}),
    ),
    "dp2-ddp-to-pp2": ((2, {"dp": 2, "dp_mode": "ddp"}), (2, {"pp": 2})),
}


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(RELAYOUTS))
def test_a_checkpoint_resumes_at_another_layout(workdir, reference, name):
    (n1, saved_at), (n2, resumed_at) = RELAYOUTS[name]
    every = {"checkpoint": {"every": 3}}
    stopped = train(job(workdir, name, parallel=saved_at, **every), n=n1, fault="0:3:raise")
    assert stopped.returncode != 0  # ended at the start of step 4, after the checkpoint of 3
    ckpt = workdir / name / "checkpoints" / "step-000003"
    assert (ckpt / "COMPLETE").exists() and not list(ckpt.glob("*.distcp"))  # safetensors only
    cfg = job(workdir, name, parallel=resumed_at, **every)
    dry = run_cli("train", "--config", cfg, "--dry-run", cwd=workdir).stdout
    assert "resumes from step-000003" in dry
    assert ("each rank reads its share at this layout" in dry) == (saved_at != resumed_at)
    resumed = train(cfg, n=n2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 3 -> 6 (resumed)" in resumed.stderr
    assert ("resumed at a new layout" in resumed.stderr) == (saved_at != resumed_at)
    # the curve goes on as an uninterrupted run's (every layout equals one process)
    assert losses(workdir / name) == pytest.approx(reference, abs=1e-5)


@pytest.mark.mpi
def test_a_checkpoint_of_another_model_or_batch_size_is_refused_in_one_line(workdir):
    cfg = job(workdir, "other-model", train={**BASE["train"], "steps": 2})
    assert train(cfg).returncode == 0
    wider = {**BASE["model"], "n_embd": 48}
    proc = train(job(workdir, "other-model", model=wider, train={**BASE["train"], "steps": 4}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "holds another model: wte.weight is [320, 32] there, [320, 48] here" in proc.stderr
    bigger = {**BASE["train"], "steps": 4, "batch_size": 16}
    proc = train(job(workdir, "other-model", train=bigger))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "saved with train.batch_size = 8, this run has 16" in proc.stderr


def test_the_api_names_ids_outside_the_vocabulary_and_makes_its_output_folder(workdir):
    script = """
import numpy as np
from fastserve.pipeline.training.api import DistributedModel
from fastserve.pipeline.models.gpt import GPT, GPTConfig
from fastserve.pipeline.models.lstm import LSTMConfig, LSTMLM
dm = DistributedModel(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)))
try:
    dm.fit(np.full((4, 5), 60), np.zeros(4, dtype=int), epochs=1, batch_size=2)
except ValueError as e:
    print("refused:", e)
lm = DistributedModel(LSTMLM(LSTMConfig(vocab_size=20, n_layer=1, n_embd=8, block_size=8)))
lm.fit(np.ones((4, 5), dtype=int), np.ones(4, dtype=int), epochs=1, batch_size=2,
       output="api-new/run")
print("trained")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV,
        cwd=workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: x holds token id 60 (row 0); the model's vocab_size is 50" in proc.stdout
    assert "trained" in proc.stdout and (workdir / "api-new" / "run" / "metrics.jsonl").exists()


TIED_SCRIPT = """
import json, sys
import numpy as np, torch
from fastserve.pipeline.training.api import DistributedModel
from fastserve.pipeline.distributed.parallel_dims import ParallelDims
from fastserve.pipeline.models.gpt import GPT, GPTConfig
x = np.random.default_rng(0).integers(1, 40, size=(32, 9))
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=4, n_head=2, n_embd=16,
                      tie_word_embeddings=True))
dm = DistributedModel(model, strategy=ParallelDims(**json.loads(sys.argv[1])))
out = dm.fit(x, epochs=2, batch_size=8, lr=1e-2, grad_clip=0.5)
probs = dm.predict(x[:4])
if dm.env.rank == 0:
    print(json.dumps({"losses": [r["loss"] for r in out], "probs": probs.tolist()}))
"""


@pytest.mark.mpi
def test_a_head_tied_to_the_embedding_trains_over_pipeline_stages_as_one_process(workdir):
    """The first stage's embedding and the last stage's head are one weight: the same summed
    gradient, counted once in the clipping norm."""
    import numpy as np

    def run(dims: dict):
        n = dims.get("dp", 1) * dims.get("pp", 1) * dims.get("tp", 1)
        cmd = [sys.executable, "-c", TIED_SCRIPT, json.dumps(dims)]
        cmd = [str(MPIEXEC), "-n", str(n), *cmd] if n > 1 else cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV,
                              cwd=workdir)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    one = run({})
    for dims in ({"pp": 2}, {"pp": 2, "dp": 2}):
        got = run(dims)
        assert got["losses"] == pytest.approx(one["losses"], abs=1e-5), dims
        np.testing.assert_allclose(got["probs"], one["probs"], atol=1e-5)


@pytest.mark.mpi
def test_a_signal_on_a_checkpoint_step_still_requeues(workdir):
    every_step = {"checkpoint": {"every": 1}}
    proc = train(job(workdir, "usr1-every", **every_step), fault="0:2:usr1")
    assert proc.returncode == 75, proc.stderr[-2000:]  # not trained on to the end
    assert "checkpoint at step 3 saved; exit 75" in proc.stderr
    assert len(losses(workdir / "usr1-every")) == 3


@pytest.mark.mpi
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(workdir, reference):
    name = "damaged"
    cfg = job(workdir, name, parallel={"pp": 2}, checkpoint={"every": 2})
    assert train(cfg, n=2, fault="0:5:raise").returncode != 0
    ckpts = workdir / name / "checkpoints"
    (shard,) = (ckpts / "step-000004").glob("shard-00002-*.safetensors")
    shard.unlink()  # a file lost with the checkpoint still marked complete
    dry = run_cli("train", "--config", cfg, "--dry-run", cwd=workdir).stdout
    assert f"{shard.name} is missing" in dry and "resumes from step-000002" in dry
    resumed = train(cfg, n=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-000004 is damaged" in resumed.stderr and "steps 2 -> 6 (resumed)" in resumed.stderr
    assert losses(workdir / name) == pytest.approx(reference, abs=1e-5)
    # another train.batch_size: the dry run says it will be refused, as the run does
    bigger = job(workdir, name, train={**BASE["train"], "batch_size": 16})
    dry = run_cli("train", "--config", bigger, "--dry-run", cwd=workdir).stdout
    assert "was saved with train.batch_size = 8, this run has 16" in dry


def test_an_unreadable_state_json_marks_a_checkpoint_damaged(tmp_path):
    from fastserve.pipeline.training.checkpoints import damaged, latest_complete

    run = tmp_path / "run"
    for step, text in ((2, '{"step": 2, "files": {}}'), (4, '{"step": 4, "arch": "lla')):
        d = run / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(text)
        (d / "COMPLETE").write_text(f"{step}\n")
    said = []
    assert latest_complete(run, warn=said.append) == run / "checkpoints" / "step-000002"
    assert "state.json is unreadable" in said[0]
    assert damaged(run / "checkpoints" / "step-000002") is None


def test_checkpoint_settings_out_of_range_are_refused(workdir):
    for bad in ({"every": -1}, {"keep": 0}):
        proc = run_cli("train", "--config", job(workdir, "ck-bad", checkpoint=bad), "--dry-run")
        assert proc.returncode == 2 and "checkpoint.every" in proc.stderr, proc.stderr
