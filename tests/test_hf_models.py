"""FastServe's own decoders initialised from Hugging Face folders equal transformers on the same
folder, and export back to folders transformers loads: GPT-2 and the Llama family (grouped-query
attention, tied and untied heads, Qwen2's q/k/v biases, Llama 3's rope scaling)."""

import pytest
import torch

from fastserve.pipeline.errors import ConfigError
from fastserve.pipeline.models.hf_format import config_from_hf, export_hf, load_hf_weights
from fastserve.pipeline.registry import ARCHS
from fastserve.pipeline.testing.models import build_gpt2, build_llama

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FOLDERS = {
    "gpt2": lambda f: build_gpt2(f),
    "llama-gqa": lambda f: build_llama(f),
    "llama-tied-mha": lambda f: build_llama(f, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": lambda f: build_llama(f, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE),
    "mistral": lambda f: build_llama(f, model_type="mistral"),
    "qwen2": lambda f: build_llama(f, model_type="qwen2", tie_word_embeddings=True),
}


def fastserve_model(folder):
    arch, cfg = config_from_hf(folder)
    model = ARCHS[arch].model_class()(cfg)
    load_hf_weights(model, folder)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def folder(request, tmp_path_factory):
    return FOLDERS[request.param](tmp_path_factory.mktemp(request.param))


def test_logits_equal_transformers_on_the_same_folder(folder):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = fastserve_model(folder)
    ids = torch.randint(
        0, ref.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        # the cached path generation uses: prefill, then one token at a time
        from fastserve.pipeline.models.decoding import GPTCausalLM

        lm = GPTCausalLM(ours, torch.device("cpu"))
        logits, st = lm.prefill([ids[0, :30].tolist()], pad_id=0)
        assert torch.allclose(logits[0], want[0, 29], atol=1e-4)
        for t in range(30, 40):
            logits, st = lm.step(ids[:1, t], st)
            assert torch.allclose(logits[0], want[0, t], atol=1e-4)


def test_the_export_loads_in_transformers_with_the_same_logits(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = fastserve_model(folder)
    with torch.no_grad():  # a trained model differs from its start
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_hf(ours, folder, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(
        0, back.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, ours(ids), atol=1e-4)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_only_the_tensors_a_stage_holds_are_read(tmp_path):
    from fastserve.pipeline.distributed.parallelize import split_stage

    folder = build_llama(tmp_path / "m", num_hidden_layers=4)
    arch, cfg = config_from_hf(folder)
    whole = ARCHS[arch].model_class()(cfg)
    total = load_hf_weights(whole, folder)
    first = load_hf_weights(split_stage(whole, 0, 2), folder)
    last = load_hf_weights(split_stage(whole, 1, 2), folder)
    assert first + last == total and first < 0.6 * total and last < 0.6 * total


def test_folders_fastserve_cannot_train_say_why(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="model_type 'bert' cannot be trained"):
        config_from_hf(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        config_from_hf(tmp_path / "nowhere")


# -- tensor parallelism: each rank reads only its slices ---------------------------------------

TP_SCRIPT = r"""
import json, sys
import torch
from fastserve.pipeline.distributed.bootstrap import bootstrap, shutdown
from fastserve.pipeline.distributed.parallel_dims import ParallelDims
from fastserve.pipeline.distributed.parallelize import apply_tp
from fastserve.pipeline.models.hf_format import build_from_hf, held_bytes, materialize

torch.set_num_threads(1)
env = bootstrap(timeout_s=60)
mesh = ParallelDims(tp=env.world_size).build_mesh("cpu")
ids = torch.tensor(json.loads(sys.argv[2]))
out = {}
for folder in sys.argv[3:]:
    _, _, model = build_from_hf(folder)  # meta: nothing allocated, nothing read
    apply_tp(model, mesh["tp"])  # the trainer's order: split first, then read
    read = materialize(model, folder, env.device)
    with torch.no_grad():
        logits = model.eval()(ids)
    out[folder] = {"read": read, "held": held_bytes(model, folder), "logits": logits.tolist()}
everyone = env.comm.gather(out)
if env.rank == 0:
    open(sys.argv[1], "w").write(json.dumps(everyone))
shutdown(env)
"""


@pytest.mark.mpi
def test_a_tensor_parallel_rank_reads_only_its_slices_and_equals_transformers(tmp_path):
    """Llama with grouped-query attention (4 heads, 2 key/value heads) and GPT-2 (fused c_attn,
    Conv1D weights) under TP2: each rank reads its share of the bytes (its rows or columns of the
    split weights, the replicated tensors whole) and the sharded model's logits are
    transformers' on the same folder."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from fastserve.pipeline.models.hf_format import build_from_hf, materialize

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec (the mpich wheel) is not installed")
    folders = [
        build_llama(tmp_path / "llama", num_hidden_layers=4, num_key_value_heads=2),
        build_gpt2(tmp_path / "gpt2"),
    ]
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    (tmp_path / "tp.py").write_text(TP_SCRIPT)
    proc = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, str(tmp_path / "tp.py"),
         str(tmp_path / "out.json"), json.dumps(ids.tolist()), *map(str, folders)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "out.json").read_text())
    for folder in folders:
        _, _, whole = build_from_hf(folder)
        total = materialize(whole, folder, "cpu")  # one process reads every tensor once
        ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(ids).logits
        for r in ranks:
            got = r[str(folder)]
            assert got["read"] <= 1.1 * got["held"], (folder, got["read"], got["held"])
            assert got["read"] < 0.85 * total  # the split weights: half each
            err = (torch.tensor(got["logits"]) - want).abs().max()
            assert err < 1e-4, (folder, err)
        # together the ranks read the split weights once, the replicated ones once each
        assert sum(r[str(folder)]["read"] for r in ranks) == sum(
            r[str(folder)]["held"] for r in ranks
        )
