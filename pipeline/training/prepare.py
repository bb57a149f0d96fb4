"""The corpus made ready for training, once, by rank 0: the token cache of a run folder.

    <run>/tokenizer.json        the tokenizer (given, the init_from folder's, or trained here)
    <run>/data/tokens.npy       token ids (packed text, fixed rows, or instruction examples)
    <run>/data/source.json      what made them: the cache is rebuilt, or refused under
                                checkpoints, when any of it changes

The trainer calls build_token_cache on rank 0 and shares its failure with every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import checkpoints as ckpt
from .config import TrainJob
from .data import (
    check_corpus,
    encode_fixed,
    read_labeled,
    read_texts,
    tokenize,
    train_tokenizer,
)


def cache_files(run: Path) -> tuple[Path, Path, Path]:
    """(tokenizer.json, data/tokens.npy, data/labels.json) of run folder `run`."""
    return run / "tokenizer.json", run / "data" / "tokens.npy", run / "data" / "labels.json"


def build_token_cache(job: TrainJob, run: Path, init_from: str | None, instruct: bool) -> None:
    """Rank 0: tokenize the corpus once into data/tokens.npy, tied to what made it
    (data/source.json: the corpus files' paths, sizes and times, columns, tokenizer by content,
    vocabulary)."""
    d = job.data
    classifier = job.model.arch == "classifier"
    tok_json, tokens_file, labels_file = cache_files(run)
    # the tokenizer: the folder fine-tuned from, one given, or one trained on the corpus
    tokenizer = str(Path(init_from) / "tokenizer.json") if init_from else d.tokenizer
    eos = "<|endoftext|>"
    if init_from:
        from ..models.hf_format import eos_token

        eos = eos_token(init_from)
    columns = tuple(c for c in (d.prompt_column, d.response_column, d.messages_column) if c)
    corpus = check_corpus(
        d.paths,
        None if instruct else d.text_column,
        d.label_column if classifier else None,
        columns,
    )
    source = {
        "corpus": corpus["identity"],
        "text_column": d.text_column,
        "label_column": d.label_column if classifier else None,
        "vocab_size": None if tokenizer else d.vocab_size,
        "seq_len": d.seq_len if classifier or instruct else None,
        "instructions": list(columns) or None,
        # the tokenizer by content, not by where it lies: a template edited in place counts, a
        # folder moved elsewhere is the same tokenizer
        "tokenizer_sha256": _tokenizer_digest(tokenizer, init_from),
    }
    source_file = run / "data" / "source.json"
    if tokens_file.exists():
        if not source_file.exists():  # made before FastServe recorded it: taken as it is
            source_file.write_text(json.dumps(source))
            return
        made = json.loads(source_file.read_text())
        # a key the cache's record lacks was not recorded then (an older FastServe): not news
        changed = ", ".join(k for k in source if k in made and made[k] != source[k])
        if not changed:
            source_file.write_text(json.dumps(source))
            return
        if ckpt.latest_complete(run) is not None:
            raise ConfigError(
                f"{run}: its checkpoints were trained on other data ({changed} changed since); "
                "a run folder trains on one corpus: give a new output.path, or remove "
                f"{run / 'checkpoints'} to start over"
            )
        print(f"{run}: {changed} changed since the token cache was made: rebuilding it",
              file=sys.stderr)  # fmt: skip
        tokens_file.unlink()
        if not tokenizer:
            tok_json.unlink(missing_ok=True)  # trained on the old corpus
    if tokenizer:
        tok_json.parent.mkdir(parents=True, exist_ok=True)
        tok_json.write_text(Path(tokenizer).read_text())
    if instruct:
        from .instructions import encode_examples, save_examples

        ids, mask, rejected = encode_examples(d, tok_json, eos, init_from)
        save_examples(run / "data", ids, mask, rejected)
        source_file.write_text(json.dumps(source))
        return
    if classifier:
        texts, labels = read_labeled(d.paths, d.text_column, d.label_column)
    else:
        texts = read_texts(d.paths, d.text_column)
    if not tokenizer and not tok_json.exists():
        train_tokenizer(texts, d.vocab_size, tok_json)
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    if classifier:  # fixed-length rows of ids, and label ids by sorted label name
        names = sorted(set(labels))
        labels_file.write_text(json.dumps(names))
        index = {n: i for i, n in enumerate(names)}
        np.save(
            run / "data" / "label_ids.npy",
            np.array([index[x] for x in labels], dtype=np.int64),
        )
        tokens = encode_fixed(texts, tok_json, d.seq_len)
    else:
        tokens, _, _ = tokenize(texts, tok_json, eos)
    np.save(tokens_file.with_suffix(".tmp.npy"), tokens, allow_pickle=False)
    os.replace(tokens_file.with_suffix(".tmp.npy"), tokens_file)
    source_file.write_text(json.dumps(source))


def _tokenizer_digest(tokenizer: str | None, init_from: str | None) -> str | None:
    """sha256 over the files that decide the tokens: the tokenizer, and a Hugging Face folder's
    tokenizer config and chat template (eos, the template that renders messages)."""
    import hashlib

    if not tokenizer:
        return None
    files = [Path(tokenizer)]
    if init_from:
        files += [Path(init_from) / n for n in ("tokenizer_config.json", "chat_template.jinja")]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\0")
    return h.hexdigest()
