"""Instruction data: a prompt and a response per row, the loss on the response only.

    [data]
    prompt_column = "prompt"         # with response_column: prompt + response + eos, as they are
    response_column = "response"
    # messages_column = "messages"   # or chat messages, rendered by the tokenizer's chat template

A messages column holds one chat a row, [{role, content}, ...] with the assistant's reply last:
as a list<struct> column or as JSON text. The prompt is the turns before the reply, rendered as
the template renders them for generation (add_generation_prompt): what `infer` gives the model.
The reply is what the template writes for the last turn, its own end-of-turn marker included
(<|im_end|>, <|eot_id|>, ...): the model learns to end a turn as the chats it serves end one.
Earlier assistant turns are context, not trained on.

Each example becomes one row of seq_len + 1 token ids, right-padded, with a mask that is true on
the response's tokens (and its end): the targets elsewhere are -100 and add nothing to the loss.
Rows that cannot be trained on are set aside with a reason and counted (data/rejected.json), as
`infer` does: null_prompt, empty_prompt, null_response, empty_response, too_long (an example
longer than seq_len + 1 tokens is not cut: a cut response would teach the model to stop
mid-answer); for chats also null_messages, bad_messages (not JSON, or not a list of {role,
content} with both strings), no_assistant_reply (the last turn is not the assistant's), no_prompt
(the reply is the only turn: nothing to answer; templates refuse an empty chat) and
template_error (the chat template raised on the row, e.g. roles that must alternate).

The loss of a step is the mean over every response token of the global batch, whatever the
layout: the trainer scales each micro-batch's summed loss by the step's token count (`valid`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import InputError
from ..inputs import resolve_inputs
from .data import PackedData

IGNORE = -100


def _rows(paths, columns: list[str]):
    for path in resolve_inputs(paths).values():
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(
                f"training corpus file {path} has no column {missing[0]!r}; set data."
                + ("messages_column" if len(columns) == 1 else "prompt_column / response_column")
                + f" (columns: {', '.join(names)})"
            )
        yield from pq.read_table(path, columns=columns).to_pylist()


def encode_examples(d, tokenizer_json: Path, eos: str, chat_folder: str | None):
    """(ids (N, seq_len + 1) int32, mask (N, seq_len + 1) bool, rejected {reason: count})."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tok.token_to_id(eos)
    pad = tok.token_to_id("<pad>") or 0
    width = d.seq_len + 1
    ids, masks, rejected = [], [], Counter()
    details: dict[str, str] = {}  # the first row's detail of a reason, for the error below
    chat = None
    if d.messages_column:
        from transformers import AutoTokenizer

        chat = AutoTokenizer.from_pretrained(chat_folder, local_files_only=True)
        if not chat.chat_template:
            raise InputError(
                f"data.messages_column needs a chat template, and {chat_folder}'s tokenizer has "
                "none; use prompt_column and response_column"
            )
        specials = set(chat.all_special_ids) | {
            i for i, t in chat.added_tokens_decoder.items() if t.special
        }
    columns = [d.messages_column] if chat else [d.prompt_column, d.response_column]
    for row in _rows(d.paths, columns):
        if chat:
            turns, reason = chat_turns(row[d.messages_column])
            if reason is None:
                try:
                    p_ids, r_ids = _render_chat(chat, tok, turns, specials, eos_id)
                except Exception as e:  # noqa: BLE001 - the template is the model's own code:
                    reason = "template_error"  # what it raises on a row is about that row
                    details.setdefault(reason, f"{type(e).__name__}: {e}")
            if reason is not None:
                rejected[reason] += 1
                continue
        else:
            prompt, response = row[d.prompt_column], row[d.response_column]
            if prompt is None or not isinstance(prompt, str):
                rejected["null_prompt"] += 1
                continue
            if not prompt.strip():
                rejected["empty_prompt"] += 1
                continue
            if response is None or not isinstance(response, str):
                rejected["null_response"] += 1
                continue
            if not response.strip():
                rejected["empty_response"] += 1
                continue
            p_ids = tok.encode(prompt).ids
            r_ids = tok.encode(response, add_special_tokens=False).ids + [eos_id]
        if len(p_ids) + len(r_ids) > width:
            rejected["too_long"] += 1
            continue
        row_ids = np.full(width, pad, dtype=np.int32)
        row_mask = np.zeros(width, dtype=bool)
        row_ids[: len(p_ids) + len(r_ids)] = p_ids + r_ids
        row_mask[len(p_ids) : len(p_ids) + len(r_ids)] = True
        ids.append(row_ids)
        masks.append(row_mask)
    if len(ids) < 2:
        why = "".join(f"; {reason}: {detail}" for reason, detail in details.items())
        raise InputError(
            f"the instruction corpus {list(d.paths)} gives {len(ids)} usable examples "
            f"(set aside: {dict(rejected) or 'none'}{why}); at least 2 are needed"
        )
    return np.stack(ids), np.stack(masks), dict(rejected)


def chat_turns(value) -> tuple[list[dict] | None, str | None]:
    """(the chat's turns as {role, content}, None), or (None, the reason it is set aside).

    `value` is a list of {role, content} (a list<struct> column) or its JSON text (a string
    column): both are common ways to store chats in Parquet. Only role and content reach the
    template, as `infer` gives them (a struct column's other fields are null in most rows)."""
    if value is None:
        return None, "null_messages"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, "bad_messages"
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
    ):
        return None, "bad_messages"
    if not value or value[-1]["role"] != "assistant":
        return None, "no_assistant_reply"
    if any(not isinstance(m.get("content"), str) for m in value[:-1]):
        return None, "bad_messages"
    reply = value[-1].get("content")
    if reply is None:
        return None, "null_response"
    if not isinstance(reply, str):
        return None, "bad_messages"
    if not reply.strip():
        return None, "empty_response"
    if len(value) == 1:
        return None, "no_prompt"
    return [{"role": m["role"], "content": m["content"]} for m in value], None


class TemplateMismatch(ValueError):
    """The template's rendering of a chat holds no trace of its reply's content."""


def _render_chat(chat, tok, turns: list[dict], specials: set[int], eos_id: int):
    """(prompt ids, reply ids) of a chat whose last turn is the assistant's reply.

    The prompt is the turns before the reply rendered with add_generation_prompt, tokenized on
    its own: the very ids `infer` gives the model. The reply is what the template writes after
    that prompt in its rendering of the whole chat, so it ends with the template's own
    end-of-turn marker; what the template writes after the last special token of the reply
    (the newline between turns) is dropped, as generation stops at that marker and never sees
    it. A template whose whole chat does not begin with its generation prompt (it writes an
    assistant turn otherwise than it prompts for one) gives the reply's content and what it
    writes after the content. A reply without any special token (a template with no end-of-turn
    marker) ends with eos, as a prompt/response row does, so the model still learns to stop."""
    prompt = chat.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
    whole = chat.apply_chat_template(turns, tokenize=False)
    if whole.startswith(prompt):
        reply = whole[len(prompt) :]
    else:
        content = turns[-1]["content"]
        at = whole.rfind(content)
        if at < 0:
            raise TemplateMismatch(
                "the chat template's rendering of a chat holds neither its generation prompt "
                "nor the reply's text; FastServe cannot tell the reply apart"
            )
        reply = content + whole[at + len(content) :]
    p_ids = tok.encode(prompt, add_special_tokens=False).ids
    r_ids = tok.encode(reply, add_special_tokens=False).ids
    marks = [k for k, t in enumerate(r_ids) if t in specials]
    if not marks:
        return p_ids, r_ids + [eos_id]
    if not tok.decode(r_ids[marks[-1] + 1 :], skip_special_tokens=False).strip():
        r_ids = r_ids[: marks[-1] + 1]
    return p_ids, r_ids


def save_examples(folder: Path, ids, mask, rejected) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mask.npy", mask, allow_pickle=False)
    (folder / "rejected.json").write_text(json.dumps(rejected))
    np.save(folder / "tokens.tmp.npy", ids, allow_pickle=False)
    (folder / "tokens.tmp.npy").replace(folder / "tokens.npy")  # last: it marks the cache whole


class InstructionData(PackedData):
    """Padded examples with a loss mask; the same (seed, step) -> batch rule as PackedData."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, val_fraction: float, seed: int):
        self.ids, self.mask, self.seed = ids, mask, seed
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = max(1, int(len(ids) * val_fraction))
        self.val, self.train = order[:n_val], order[n_val:]

    def _seqs(self, idx: np.ndarray):
        import torch

        ids = torch.from_numpy(self.ids[idx].astype(np.int64))
        keep = torch.from_numpy(self.mask[idx][:, 1:])
        return ids[:, :-1], torch.where(keep, ids[:, 1:], IGNORE)

    def valid(self, idx: np.ndarray) -> int:
        """Response tokens the targets of these examples hold."""
        return int(self.mask[idx][:, 1:].sum())

    def val_indices(self, k: int, batch_size: int) -> np.ndarray:
        return np.take(self.val, range(k * batch_size, (k + 1) * batch_size), mode="wrap")


class ArrayError(InputError, ValueError):
    """fit(x, y) arrays that cannot be trained on. An InputError, as every input mistake (the
    message is the whole report), and a ValueError, what callers of an array API catch."""


def _token_ids(value, name: str) -> np.ndarray:
    """`value` (a NumPy array, tensor or nested lists) as int64 token ids; an ArrayError naming
    what is wrong where NumPy would raise or quietly make an object or float array of it."""
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    try:
        a = np.asarray(value)
    except ValueError:  # nested lists of different lengths: NumPy refuses them
        a = None
    if a is None or a.dtype == object:
        lengths = []
        if isinstance(value, (list, tuple)) and all(
            hasattr(r, "__len__") and not isinstance(r, str) for r in value
        ):
            lengths = [len(r) for r in value]
        if len(set(lengths)) > 1:
            short = next(i for i, n in enumerate(lengths) if n != lengths[0])
            raise ArrayError(
                f"{name}'s rows differ in length ({min(lengths)} to {max(lengths)} tokens; row "
                f"{short} has {lengths[short]}): pad every row to one length with 0, the pad id "
                "(as Keras' pad_sequences does)"
            )
        raise ArrayError(f"{name} holds values that are not token ids; expected integers")
    if a.dtype.kind in "USO":
        raise ArrayError(f"{name} holds text; fit takes token ids: tokenize the texts first")
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ArrayError(
                f"{name} holds {a.dtype} values that are not whole numbers; expected integer "
                "token ids"
            )
    return a.astype(np.int64)


def _check_range(a: np.ndarray, name: str, vocab_size: int | None) -> None:
    """Token ids index the embedding: a negative id or one past the vocabulary fails deep in
    the model (an index error, or a device-side assert on a GPU), far from its cause."""
    if a.size and a.min() < 0:
        at = np.unravel_index(int(np.argmin(a >= 0)), a.shape)
        raise ArrayError(
            f"{name} holds a negative token id ({a[at]}, row {at[0]}); token ids run from 0 to "
            "the model's vocab_size - 1"
        )
    if vocab_size is not None and a.size and a.max() >= vocab_size:
        at = np.unravel_index(int(np.argmax(a >= vocab_size)), a.shape)
        raise ArrayError(
            f"{name} holds token id {a[at]} (row {at[0]}); the model's vocab_size is "
            f"{vocab_size}, so token ids run from 0 to {vocab_size - 1}: build the model with "
            f"vocab_size > {a.max()}, or map the ids into its vocabulary"
        )


def model_inputs(x, y=None, *, vocab_size: int | None, block_size: int | None):
    """Rows of token ids for predict/evaluate, checked as fit checks them: x (rows, length) of
    ids below vocab_size, at most block_size long; with y (evaluate), one id a row. Returns x,
    or (x, y) when y is given; an ArrayError otherwise."""
    if x is None:
        raise ArrayError("x is None; expected rows of token ids (rows, length)")
    x = _token_ids(x, "x")
    if x.ndim != 2 or x.size == 0:
        raise ArrayError(
            f"x has shape {x.shape}; expected at least one row of token ids (rows, length): "
            "x.reshape(1, -1) for one row"
        )
    _check_range(x, "x", vocab_size)
    if block_size is not None and x.shape[1] > block_size:
        raise ArrayError(
            f"x's rows are {x.shape[1]} tokens long; the model's block_size is {block_size}: "
            f"keep at most {block_size} tokens a row"
        )
    if y is None:
        return x
    y = _token_ids(y, "y")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise ArrayError(f"y has shape {y.shape}; expected one label a row of x, ({len(x)},)")
    _check_range(y, "y", vocab_size)
    return x, y


class ArrayData(InstructionData):
    """In-memory arrays (the Python API's fit(x, y)): token ids x (N, L); with y (N,), the
    next token after each row (the loss on the last position only); without, x itself as a
    language-modelling corpus (each position predicts the next; pad id 0 targets ignored).
    `val_fraction` 0: no validation rows.

    `vocab_size` and `block_size`, the model's, when given: ids must lie in the vocabulary and
    the model must read no more than block_size tokens a row. Without these checks such arrays
    fail inside the model's forward pass, with a traceback that does not say which array is
    wrong. Every other odd array (ragged rows, 1-D, empty, y of another length) is an
    ArrayError too, with what to do."""

    def __init__(
        self,
        x,
        y,
        val_fraction: float,
        seed: int,
        *,
        vocab_size: int | None = None,
        block_size: int | None = None,
    ):
        if x is None:
            raise ArrayError("x is None; fit needs rows of token ids (rows, length)")
        x = _token_ids(x, "x")
        if x.size == 0 and (x.ndim == 1 or len(x) == 0):
            raise ArrayError("x is empty; fit needs at least one row of token ids")
        if x.ndim != 2:
            raise ArrayError(
                f"x has shape {x.shape}; expected rows of token ids (rows, length): "
                "x.reshape(1, -1) for one row, x.reshape(-1, 1) for one token a row"
            )
        need = 1 if y is not None else 2
        if x.shape[1] < need:
            raise ArrayError(
                f"x's rows are {x.shape[1]} token{'s' if x.shape[1] != 1 else ''} long; "
                + ("with y, each row needs at least 1 token" if y is not None else
                   "as a language-modelling corpus (no y) each row needs at least 2 tokens, "
                   "the first predicting the second")
            )  # fmt: skip
        _check_range(x, "x", vocab_size)
        if y is None:
            ids, mask = x, x != 0
            mask[:, 0] = False
        else:
            y = _token_ids(y, "y")
            if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
                y = y[:, 0]
            if y.ndim != 1:
                raise ArrayError(
                    f"y has shape {y.shape}; expected one token id a row, shape ({len(x)},)"
                )
            if len(y) != len(x):
                raise ArrayError(
                    f"x has {len(x)} rows but y has {len(y)}; expected one label a row"
                )
            _check_range(y, "y", vocab_size)
            ids = np.concatenate([x, y[:, None]], axis=1)
            mask = np.zeros(ids.shape, dtype=bool)
            mask[:, -1] = True
        inputs = ids.shape[1] - 1  # the tokens the model reads a row
        if block_size is not None and inputs > block_size:
            if y is not None:
                what = f"x's rows are {x.shape[1]} tokens long; the model's block_size is"
                keep = f"keep at most {block_size} tokens a row (the last ones, nearest y)"
            else:
                what = (
                    f"x's rows are {x.shape[1]} tokens long ({inputs} inputs each, the last "
                    "token being only a target); the model's block_size is"
                )
                keep = f"keep at most {block_size + 1} tokens a row"
            raise ArrayError(
                f"{what} {block_size}: {keep}, or build the model with a larger block_size"
            )
        self.ids, self.mask, self.seed = ids, mask, seed
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = int(len(ids) * val_fraction) if val_fraction > 0 else 0
        if len(ids) - n_val < 1:
            raise ArrayError(f"validation_split {val_fraction} leaves no training rows")
        self.val, self.train = order[:n_val], order[n_val:]
