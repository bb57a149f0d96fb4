"""Fine-tuning a Hugging Face checkpoint (a tiny Llama-family folder built here, grouped-query
attention, untied head) over real MPI ranks: every layout's losses equal one process, each stage
reads only its own tensors, and export/ is a folder transformers loads and `fastserve infer`
serves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline.testing import sample_texts, write_corpus
from fastserve.pipeline.testing.models import build_llama

from conftest import read_sorted, run_cli
from reference import hf_generate

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec (the mpich wheel) is not installed"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    build_llama(d / "llama", num_hidden_layers=4, num_key_value_heads=2)
    write_corpus(d / "corpus", n_files=2, rows=200)
    return d


def train(
    work, name, parallel: str = "", n: int = 1, data: str = "", steps: int = 6, folder="llama"
) -> list[float]:
    job = work / f"{name}.toml"
    data = data or 'paths = ["corpus"]\n'
    job.write_text(
        f'[model]\ninit_from = "{folder}"\n[data]\n{data}seq_len = 32\n'
        f"[train]\nsteps = {steps}\nbatch_size = 8\nlr = 1e-3\nwarmup_steps = 2\neval_every = 0\n"
        f'[parallel]\nmicrobatches = 2\ntimeout_s = 60\n{parallel}\n[output]\npath = "{name}"\n'
    )
    cmd = [sys.executable, "-m", "fastserve.jobs", "train", "--config", str(job)]
    proc = subprocess.run(
        [str(MPIEXEC), "-n", str(n), *cmd] if n > 1 else cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x)["loss"] for x in (work / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(work):
    return train(work, "single")


@pytest.mark.parametrize(
    "name, parallel, n", [("pp2", "pp = 2", 2), ("pp2xtp2", "pp = 2\ntp = 2", 4)]
)
def test_fine_tuning_over_any_layout_equals_one_process(work, reference, name, parallel, n):
    got = train(work, name, parallel, n)
    assert got == pytest.approx(reference, abs=1e-5)
    assert reference[-1] < reference[0]  # it learns from the checkpoint's start
    assert json.loads((work / name / "export" / "config.json").read_text())["model_type"] == "llama"


def test_a_tied_head_fine_tunes_over_pipeline_stages_as_one_process(work):
    """GPT-2 ties its head to its embedding: split over stages, the two copies get one gradient
    and stay one weight (the export has it once, as transformers ties it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve.pipeline.testing.models import build_gpt2

    build_gpt2(work / "gpt2")
    one = train(work, "gpt2-single", folder="gpt2")
    for name, parallel, n in (("gpt2-pp2", "pp = 2", 2), ("gpt2-pp2xtp2", "pp = 2\ntp = 2", 4)):
        assert train(work, name, parallel, n, folder="gpt2") == pytest.approx(one, abs=1e-5)
    a, b = (
        AutoModelForCausalLM.from_pretrained(work / r / "export", torch_dtype=torch.float32)
        for r in ("gpt2-single", "gpt2-pp2")
    )
    assert a.lm_head.weight.data_ptr() != 0 and b.config.tie_word_embeddings
    assert torch.allclose(a.lm_head.weight, b.lm_head.weight, atol=1e-5)
    assert torch.equal(b.lm_head.weight, b.transformer.wte.weight)


def test_the_export_is_a_folder_transformers_loads_and_infer_serves(work, reference):
    import torch
    from transformers import AutoModelForCausalLM

    export = work / "single" / "export"
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(work / "llama", torch_dtype=torch.float32)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(model.parameters(), start.parameters(), strict=True)
    ]
    assert max(moved) > 1e-4  # trained, not the checkpoint it started from
    assert AutoTokenizer.from_pretrained(export).eos_token == "<|endoftext|>"
    prompts = sample_texts(6, seed=3, max_words=8)
    assert_served_like_generate(work, "single/export", prompts, 8)


def test_dry_run_on_the_folder_shows_stages_and_shards(work):
    job = work / "dry.toml"
    job.write_text(
        '[model]\ninit_from = "llama"\n[data]\npaths = ["corpus"]\nseq_len = 32\n'
        '[parallel]\npp = 2\ntp = 2\n[output]\npath = "dry"\n'
    )
    out = run_cli("train", "--config", job, "--dry-run", cwd=work, check=True).stdout
    assert "model llama" in out and "(from " in out and "stage 1 (pp rank 1): layers 2-3" in out
    assert "tensor parallel: 2 of 4 heads" in out


# -- instruction data: a prompt and a response, the loss on the response only -----------------

INSTRUCT = 'paths = ["instruct"]\nprompt_column = "prompt"\nresponse_column = "response"\n'


@pytest.fixture(scope="module")
def instruct(work):
    texts = sample_texts(120, seed=5, max_words=6)
    prompts = [f"Say it again: {t}\n" for t in texts] + [None, "fine", "long " * 40]
    responses = [t for t in texts] + ["x", "", "y"]
    (work / "instruct").mkdir()
    pq.write_table(
        pa.table({"prompt": prompts, "response": responses}), work / "instruct" / "a.parquet"
    )
    return train(work, "instruct-single", data=INSTRUCT)


def test_instruction_losses_count_response_tokens_only_and_equal_over_layouts(work, instruct):
    import numpy as np

    from fastserve.pipeline.training.instructions import InstructionData

    data = work / "instruct-single" / "data"
    assert json.loads((data / "rejected.json").read_text()) == {
        "null_prompt": 1, "empty_response": 1, "too_long": 1,
    }  # fmt: skip
    ids, mask = np.load(data / "tokens.npy"), np.load(data / "mask.npy")
    assert len(ids) == 120
    x, y = InstructionData(ids, mask, 0.1, 0)._seqs(np.array([0]))
    tok = AutoTokenizer.from_pretrained(work / "llama")
    answer = [t for t in y[0].tolist() if t != -100]
    assert tok.decode(answer[:-1]).strip() in {
        t.strip() for t in sample_texts(120, seed=5, max_words=6)
    }
    assert answer[-1] == tok.eos_token_id  # the reply ends with eos, and only it counts
    dry = run_cli("train", "--config", work / "instruct-single.toml", "--dry-run", cwd=work)
    assert dry.returncode == 0 and "columns prompt, response" in dry.stdout, dry.stderr
    status = run_cli("status", work / "instruct-single", check=True).stdout
    assert "complete: exported" in status, status
    got = train(work, "instruct-pp2", "pp = 2", 2, data=INSTRUCT)
    assert got == pytest.approx(instruct, abs=1e-5)


def test_a_llama_folder_fine_tuned_pp2_tp2_on_instructions_is_exported_and_served(work, instruct):
    import torch
    from transformers import AutoModelForCausalLM

    losses = train(work, "instruct-pp2tp2", "pp = 2\ntp = 2", 4, data=INSTRUCT, steps=50)
    assert losses[-1] < 0.8 * losses[0]  # it learns
    export = work / "instruct-pp2tp2" / "export"
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    assert model.config.model_type == "llama"
    prompts = [f"Say it again: {t}\n" for t in sample_texts(4, seed=5, max_words=6)]
    assert_served_like_generate(work, "instruct-pp2tp2/export", prompts, 12)


def assert_served_like_generate(work, export: str, prompts: list[str], new_tokens: int):
    """`fastserve infer --task generate` on the export gives what transformers' generate does."""
    name = export.split("/")[0]
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(len(prompts))], "text": prompts}),
        work / f"{name}-prompts.parquet",
    )
    (work / f"{name}-gen.toml").write_text(
        f'[input]\npaths = ["{name}-prompts.parquet"]\n[model]\npath = "{export}"\n'
        f'[task]\nname = "generate"\nmax_new_tokens = {new_tokens}\n[output]\npath = "{name}-gen"\n'
    )
    run_cli("infer", "--config", work / f"{name}-gen.toml", "--executor", "serial", check=True)
    tok = AutoTokenizer.from_pretrained(work / export)
    ref = hf_generate(work / export, prompts, [new_tokens] * len(prompts))
    want = [tok.decode(r, skip_special_tokens=True) for r in ref]
    assert read_sorted(work / f"{name}-gen").column("generated").to_pylist() == want
