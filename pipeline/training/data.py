"""Training data: a Parquet corpus tokenized once, packed into fixed-length sequences.

Documents are joined with an end-of-text token and cut into sequences of seq_len + 1 tokens
(input and target shifted by one). Which sequences a step reads is a pure function of (seed, step),
so every run, resumed or not, and every parallel layout sees the same data; each data-parallel rank
takes its own slice of the step's global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import InputError
from ..inputs import resolve_inputs
from ..plan import is_string_type

SPECIALS = ["<pad>", "<|endoftext|>"]


def check_corpus(
    paths, text_column: str | None, label_column: str | None = None, columns: tuple = ()
) -> dict:
    """What the corpus holds, read from the files' footers only (no rows): every file readable
    Parquet with a string `text_column` (and `label_column`); an InputError naming the file
    otherwise. Returns files, rows and the files' identity (paths, sizes, modification times):
    what the token cache is built from."""
    files = resolve_inputs(paths)
    if not files:
        raise InputError(f"data.paths {list(paths)} match no Parquet file")
    rows, identity = 0, []
    for path in files.values():
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InputError(f"training corpus file {path} is not readable Parquet ({e})") from None
        schema = meta.schema.to_arrow_schema()
        for column in columns:  # instruction data's
            if column not in schema.names:
                raise InputError(
                    f"training corpus file {path} has no column {column!r} (columns: "
                    f"{', '.join(schema.names)}); set data.prompt_column / response_column / "
                    "messages_column"
                )
        if text_column is not None and (
            text_column not in schema.names or not is_string_type(schema.field(text_column).type)
        ):
            found = schema.field(text_column).type if text_column in schema.names else "absent"
            raise InputError(
                f"training corpus file {path}: column {text_column!r} is {found}; expected a "
                f"string column of texts (set data.text_column; columns: {', '.join(schema.names)})"
            )
        if label_column and label_column not in schema.names:
            raise InputError(
                f"training corpus file {path} has no label column {label_column!r}; set data.label_column"
            )
        rows += meta.num_rows
        st = Path(path).stat()
        identity.append([str(path), st.st_size, st.st_mtime_ns])
    if rows == 0:
        raise InputError(f"the training corpus {list(paths)} holds no rows")
    return {"files": len(files), "rows": rows, "identity": identity}


def read_labeled(paths, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of the rows with a non-empty text and a label."""
    texts, labels = [], []
    for path in resolve_inputs(paths).values():
        schema = pq.read_schema(path)
        if label_column not in schema.names:
            raise InputError(
                f"training corpus file {path} has no label column {label_column!r}; set data.label_column"
            )
        t = pq.read_table(path, columns=[text_column, label_column])
        for text, label in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True):
            if text and text.strip() and label is not None:
                texts.append(text)
                labels.append(str(label))
    if not texts:
        raise InputError(f"the training corpus {list(paths)} holds no labeled text")
    return texts, labels


def read_texts(paths, text_column: str) -> list[str]:
    texts: list[str] = []
    for path in resolve_inputs(paths).values():
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InputError(f"training corpus file {path} is not readable Parquet ({e})") from None
        if text_column not in schema.names or not is_string_type(schema.field(text_column).type):
            raise InputError(
                f"training corpus file {path} has no string column {text_column!r}; set data.text_column"
            )
        col = pq.read_table(path, columns=[text_column]).column(0).to_pylist()
        texts += [t for t in col if t and t.strip()]
    if not texts:
        raise InputError(f"the training corpus {list(paths)} holds no non-empty text")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Path:
    """A byte-level BPE tokenizer (tokenizers), saved as tokenizer.json; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def tokenize(
    texts: list[str], tokenizer_json: Path, eos_token: str = "<|endoftext|>"
) -> tuple[np.ndarray, int, int]:
    """(all tokens, eos between documents, as uint32), eos id, vocabulary size."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.token_to_id(eos_token)
    if eos is None:
        raise InputError(
            f"tokenizer {tokenizer_json} has no {eos_token} token; FastServe packs documents with it"
        )
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids
        ids.append(eos)
    return np.array(ids, dtype=np.uint32), eos, tok.get_vocab_size()


class PackedData:
    """Fixed-length sequences of a token stream, split into training and validation sets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int):
        n = (len(tokens) - 1) // seq_len
        if n < 2:
            raise InputError(
                f"the corpus gives {n} sequences of {seq_len + 1} tokens; give more text or lower data.seq_len"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        order = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(n * val_fraction))
        self.val, self.train = order[:n_val], order[n_val:]

    def _seqs(self, idx: np.ndarray):
        import torch

        rows = np.stack(
            [self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in idx]
        )
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1], t[:, 1:]

    def batch(self, step: int, batch_size: int, part: int = 0, parts: int = 1):
        """Inputs and targets (B/parts, seq_len) of `step`'s global batch, slice `part` of `parts`."""
        idx = self.indices(step, batch_size)
        per = batch_size // parts
        return self._seqs(idx[part * per : (part + 1) * per])

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        """The training sequences of `step`'s global batch: a pure function of (seed, step)."""
        n = len(self.train)
        epoch, start = divmod(step * batch_size, n)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.train)
        idx = np.take(
            np.concatenate(
                [perm, np.random.default_rng([self.seed, epoch + 1]).permutation(self.train)]
            ),
            range(start, start + batch_size),
            mode="wrap",
        )
        return idx

    def val_batches(self, batch_size: int, count: int, part: int = 0, parts: int = 1):
        per = batch_size // parts
        for k in range(count):
            idx = np.take(self.val, range(k * batch_size, (k + 1) * batch_size), mode="wrap")
            yield self._seqs(idx[part * per : (part + 1) * per])


class LabeledData(PackedData):
    """Texts as fixed-length rows of token ids (truncated, right-padded with 0) and their labels;
    the same (seed, step) -> batch rule as PackedData."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int):
        n = len(ids)
        if n < 2:
            raise InputError("the classifier corpus needs at least 2 labeled rows")
        self.ids, self.labels, self.seed = ids, labels, seed
        order = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(n * val_fraction))
        self.val, self.train = order[:n_val], order[n_val:]

    def _seqs(self, idx: np.ndarray):
        import torch

        return torch.from_numpy(self.ids[idx].astype(np.int64)), torch.from_numpy(
            self.labels[idx].astype(np.int64)
        )


def encode_fixed(texts: list[str], tokenizer_json: Path, seq_len: int) -> np.ndarray:
    """(N, seq_len) token ids: each text truncated to seq_len, right-padded with 0 (<pad>)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out = np.zeros((len(texts), seq_len), dtype=np.uint32)
    for i, enc in enumerate(tok.encode_batch(texts)):
        ids = enc.ids[:seq_len]
        out[i, : len(ids)] = ids
    return out
