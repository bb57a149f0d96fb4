"""Instruction data as it arrives: chats in a messages column (a list<struct> column or JSON
text), rendered by the model's chat template with the loss on the reply as the template writes it
(its own end-of-turn marker included); and the Python API's in-memory arrays, whose mistakes are
one-line errors naming what is wrong and what to do."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline.errors import UserError
from fastserve.pipeline.testing import sample_texts
from fastserve.pipeline.testing.models import CHAT_TEMPLATE, build_bpe_tokenizer, build_gpt2
from fastserve.pipeline.training.config import TrainDataConfig
from fastserve.pipeline.training.instructions import ArrayData, encode_examples

# ChatML, as Qwen writes it: every turn ends with <|im_end|>, a token of its own (not eos)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = "<|endoftext|>"


def build_chat_llama(folder: Path, template: str = CHATML) -> Path:
    """A tiny Llama folder whose tokenizer has ChatML's turn markers as special tokens and a chat
    template; eos stays <|endoftext|>, so the end of a turn and eos differ."""
    import torch
    import transformers

    tok = build_bpe_tokenizer(folder, ["<pad>", EOS, EOS, "<|im_start|>", "<|im_end|>"])
    tok.chat_template = template
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    return build_chat_llama(tmp_path_factory.mktemp("models") / "chat-llama")


def chats(n: int, seed: int = 7) -> list[list[dict]]:
    """Good chats: an optional system turn, a question, the assistant's reply."""
    out = []
    for i, text in enumerate(sample_texts(n, seed=seed, max_words=6)):
        turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        turns += [
            {"role": "user", "content": f"Say it again: {text}"},
            {"role": "assistant", "content": text},
        ]
        out.append(turns)
    return out


# Rows set aside, as JSON text, with the reason each is counted under
BAD_JSON = {
    "not json at all": "bad_messages",
    '{"role": "user", "content": "a dict, not a list"}': "bad_messages",
    '[1, 2, 3]': "bad_messages",
    '[{"role": "user"}, {"role": "assistant", "content": "the user turn has no content"}]':
        "bad_messages",
    '[{"role": "user", "content": [1]}, {"role": "assistant", "content": "x"}]': "bad_messages",
    '[{"role": "assistant", "content": "a reply with nothing before it"}]': "no_prompt",
    '[{"role": "user", "content": "a question without an answer"}]': "no_assistant_reply",
    "[]": "no_assistant_reply",
    '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]': "empty_response",
    '[{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]': "null_response",
}  # fmt: skip


def write_chats(folder: Path, good: list[list[dict]], bad: dict[str, str]) -> dict[str, int]:
    """a.parquet: the first half of `good` as a list<struct> column (with a null row);
    b.parquet: the rest as JSON text, then the `bad` texts. Returns the reasons expected."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(good) // 2
    pq.write_table(pa.table({"messages": good[:half] + [None]}), folder / "a.parquet")
    texts = [json.dumps(c) for c in good[half:]] + list(bad)
    pq.write_table(pa.table({"messages": pa.array(texts, pa.string())}), folder / "b.parquet")
    want: dict[str, int] = {"null_messages": 1}
    for reason in bad.values():
        want[reason] = want.get(reason, 0) + 1
    return want


def encode(folder: Path, model: Path, seq_len: int = 64):
    d = TrainDataConfig(paths=(str(folder),), messages_column="messages", seq_len=seq_len)
    return encode_examples(d, model / "tokenizer.json", EOS, str(model))


def assert_rows_are_prompt_then_reply(ids, mask, good, model: Path, end: list[int]):
    """Each example is the template's prompt (apply_chat_template with add_generation_prompt)
    then the reply's tokens followed by `end`; the mask is true on exactly the reply and `end`."""
    tok = AutoTokenizer.from_pretrained(model)
    assert len(ids) == len(good)
    for row, m, chat in zip(ids, mask, good, strict=True):
        prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        reply = tok(chat[-1]["content"], add_special_tokens=False)["input_ids"] + end
        n = len(prompt) + len(reply)
        assert row[: len(prompt)].tolist() == prompt
        assert row[len(prompt) : n].tolist() == reply
        assert m.tolist() == [len(prompt) <= k < n for k in range(len(m))]


def test_chats_as_json_text_or_structs_encode_alike_and_bad_rows_are_set_aside(
    tmp_path, chat_llama
):
    good = chats(8)
    want = write_chats(tmp_path / "c", good, BAD_JSON)
    ids, mask, rejected = encode(tmp_path / "c", chat_llama)
    assert rejected == want
    im_end = AutoTokenizer.from_pretrained(chat_llama).convert_tokens_to_ids("<|im_end|>")
    assert_rows_are_prompt_then_reply(ids, mask, good, chat_llama, [im_end])


def write_structs(folder: Path, good: list[list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"messages": good}), folder / "a.parquet")


def test_a_reply_ends_with_the_templates_end_of_turn_not_eos(tmp_path, chat_llama):
    good = chats(4)
    write_structs(tmp_path / "c", good)
    ids, mask, _ = encode(tmp_path / "c", chat_llama)
    tok = AutoTokenizer.from_pretrained(chat_llama)
    for row, m, chat in zip(ids, mask, good, strict=True):
        reply = row[m].tolist()
        assert reply[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.eos_token_id not in reply
        assert tok.decode(reply) == chat[-1]["content"] + "<|im_end|>"  # the "\n" after: not


def test_a_template_without_an_end_of_turn_marker_ends_the_reply_with_eos(tmp_path):
    """FastServe's test template writes `role: content\\n` with no marker at the end of a turn,
    and its generation prompt (`assistant:`) is not how it writes an assistant turn: the reply
    is the content and what the template writes after it, then eos, so the model learns to stop."""
    model = build_gpt2(tmp_path / "gpt2", chat_template=CHAT_TEMPLATE)
    good = chats(4)
    write_structs(tmp_path / "c", good)
    ids, mask, _ = encode(tmp_path / "c", model)
    tok = AutoTokenizer.from_pretrained(model)
    for row, m, chat in zip(ids, mask, good, strict=True):
        reply = row[m].tolist()
        assert tok.decode(reply) == chat[-1]["content"] + "\n" + EOS
        prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
        assert tok.decode(row[: int(np.argmax(m))].tolist()) == prompt


def test_a_template_that_raises_on_a_row_sets_it_aside(tmp_path):
    """Templates that check their turns (roles must alternate, ...) raise on a row that breaks
    the rule: the row is set aside as template_error, and the corpus's other rows train."""
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = build_chat_llama(tmp_path / "strict", strict)
    good = [c[-2:] for c in chats(4)]  # no system turn: this template refuses one
    bad = json.dumps([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
    write_chats(tmp_path / "c", good, {bad: "template_error"})
    ids, mask, rejected = encode(tmp_path / "c", model)
    assert rejected == {"null_messages": 1, "template_error": 1}
    assert len(ids) == len(good)


def test_too_few_usable_chats_is_one_error_with_the_reasons(tmp_path, chat_llama):
    write_chats(tmp_path / "c", chats(2)[:1], {"nope": "bad_messages"})
    with pytest.raises(UserError, match=r"1 usable examples .*'bad_messages': 1"):
        encode(tmp_path / "c", chat_llama)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths in the job file")
def test_fine_tuning_on_a_messages_column_trains_on_the_replies_only(tmp_path, chat_llama):
    """`fastserve train` on chats (struct and JSON rows, some bad): the bad rows are counted in
    data/rejected.json, the losses are finite, and the cached examples' masks cover exactly
    the assistant replies and their <|im_end|>."""
    good = chats(24)
    want = write_chats(tmp_path / "chats", good, BAD_JSON)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\ninit_from = "{chat_llama}"\n'
        '[data]\npaths = ["chats"]\nmessages_column = "messages"\nseq_len = 64\n'
        "[train]\nsteps = 4\nbatch_size = 4\nlr = 1e-3\nwarmup_steps = 1\neval_every = 2\n"
        '[output]\npath = "run"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve.jobs", "train", "--config", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "run" / "data"
    assert json.loads((data / "rejected.json").read_text()) == want
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert all(math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    im_end = AutoTokenizer.from_pretrained(chat_llama).convert_tokens_to_ids("<|im_end|>")
    ids, mask = np.load(data / "tokens.npy"), np.load(data / "mask.npy")
    assert_rows_are_prompt_then_reply(ids, mask, good, chat_llama, [im_end])


# -- the Python API's arrays -------------------------------------------------------------------


def rows(n: int = 6, length: int = 5, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, size=(n, length))


@pytest.mark.parametrize(
    "x, y, sizes, message",
    [
        ([[1, 2, 3], [4, 5], [6, 7, 8]], None, {}, r"x's rows differ in length \(2 to 3 tokens; "
         r"row 1 has 2\): pad every row to one length with 0"),
        ([[1, 2, 3], [4, 5, 6]], [[1], [2, 3]], {}, r"y's rows differ in length"),
        (rows(), None, {"vocab_size": 40}, r"x holds token id 4\d \(row \d+\); the model's "
         r"vocab_size is 40, so token ids run from 0 to 39"),
        (rows(), np.full(6, 50), {"vocab_size": 50}, r"y holds token id 50 \(row 0\); the "
         r"model's vocab_size is 50"),
        ([[1, 2, -3], [4, 5, 6]], None, {}, r"x holds a negative token id \(-3, row 0\); token "
         r"ids run from 0"),
        (rows(length=9), rows(6, 1).ravel(), {"block_size": 8}, r"x's rows are 9 tokens long; "
         r"the model's block_size is 8: keep at most 8 tokens a row"),
        (rows(length=10), None, {"block_size": 8}, r"x's rows are 10 tokens long .*block_size "
         r"is 8: keep at most 9 tokens a row"),
        (rows(), np.arange(5), {}, r"x has 6 rows but y has 5; expected one label a row"),
        (rows(), np.zeros((6, 2), dtype=int), {}, r"y has shape \(6, 2\); expected one token id "
         r"a row"),
        (np.arange(1, 6), None, {}, r"x has shape \(5,\); expected rows of token ids "
         r"\(rows, length\): x.reshape\(1, -1\) for one row"),
        ([], None, {}, r"x is empty; fit needs at least one row of token ids"),
        (np.zeros((0, 4), dtype=int), None, {}, r"x is empty"),
        (None, None, {}, r"x is None; fit needs rows of token ids"),
        ([[1.5, 2.0], [3.0, 4.0]], None, {}, r"x holds float64 values that are not whole "
         r"numbers; expected integer token ids"),
        ([["the", "movie"], ["a", "film"]], None, {}, r"x holds text; fit takes token ids: tokenize"),
        (np.zeros((3, 2, 2), dtype=int), None, {}, r"x has shape \(3, 2, 2\); expected rows"),
        ([[5], [6]], None, {}, r"x's rows are 1 token long.*at least 2"),
    ],
    ids=[
        "ragged-x", "ragged-y", "x-over-vocab", "y-over-vocab", "negative", "x-over-block",
        "lm-over-block", "y-length", "y-2d", "x-1d", "x-empty-list", "x-no-rows", "x-none",
        "x-fractions", "x-text", "x-3d", "lm-rows-too-short",
    ],
)  # fmt: skip
def test_odd_arrays_are_one_line_errors_saying_what_to_do(x, y, sizes, message):
    with pytest.raises(ValueError, match=message) as e:
        ArrayData(x, y, 0.0, 0, **sizes)
    assert isinstance(e.value, UserError)  # the CLI's kind: the message is the whole report
    assert "\n" not in str(e.value)


def test_good_arrays_of_any_form_are_taken():
    import torch

    x = rows()
    for given in (x, x.tolist(), torch.tensor(x), x.astype(np.float32)):
        data = ArrayData(given, x[:, 0], 0.0, 0, vocab_size=50, block_size=5)
        assert data.ids.shape == (6, 6) and data.ids.dtype == np.int64
        assert (data.ids[:, :-1] == x).all() and data.mask[:, -1].all()
    lm = ArrayData(x, None, 0.5, 0, vocab_size=50, block_size=4)  # 5 tokens: 4 inputs
    assert lm.ids.shape == (6, 5) and len(lm.val) == 3 and len(lm.train) == 3
    y_column = ArrayData(x, x[:, :1], 0.0, 0)  # y as a (rows, 1) column
    assert (y_column.ids[:, -1] == x[:, 0]).all()
