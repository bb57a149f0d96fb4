"""Hugging Face checkpoints from a local folder, offline, loaded once per process.

A model folder is a `save_pretrained` folder: config.json, safetensors weights and a tokenizer.
Nothing reaches a hub (`local_files_only=True`, HF_HUB_OFFLINE=1); `use_safetensors=True` so no
pickle is ever loaded from a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What each model kind is, in words for errors, and how to tell it from config.json.
KIND_NAMES = {
    "sequence-classification": "a sequence classifier (*ForSequenceClassification)",
    "causal-lm": "a causal language model (*ForCausalLM, *LMHeadModel)",
    "seq2seq-lm": "an encoder-decoder model (*ForConditionalGeneration: Marian, T5, BART, mBART, NLLB)",
    "encoder": "an encoder (BERT-like, sentence-transformers)",
    "question-answering": "an extractive question-answering model (*ForQuestionAnswering)",
}


def _fits(kind: str, config: dict) -> bool:
    archs = config.get("architectures") or []
    enc_dec = bool(config.get("is_encoder_decoder"))
    if kind == "sequence-classification":
        return any(a.endswith("ForSequenceClassification") for a in archs)
    if kind == "causal-lm":
        return not enc_dec and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if kind == "seq2seq-lm":
        return enc_dec
    if kind == "question-answering":
        return any(a.endswith("ForQuestionAnswering") for a in archs)
    if kind == "encoder":
        return not enc_dec and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    raise ValueError(kind)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: Any
    path: str
    backend: str = "hf"
    """hf (a transformers model) or fastserve (models/checkpoint.py)."""
    reference: Any = None
    """dtype int8: the float32 model the worker's first rows are checked against
    (models/int8_check.py); None once they are."""
    int8: dict | None = None
    """dtype int8: what quantize.py made of the model (quantize.describe)."""
    checked: dict = field(default_factory=dict)
    """dtype int8: the worker's check so far (rows seen, the sums compared)."""


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible; use --device cpu")
    return torch.device(device)


INT8_ON_GPU = (
    "model.dtype int8 runs on CPU only (fbgemm's int8 kernels); on a GPU use --dtype bfloat16"
)


def resolve_dtype(dtype: str, device):
    """The torch dtype the weights are loaded in; int8 loads float32, quantized after
    (models/quantize.py), and only on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "int8":
        if device.type != "cpu":
            raise ModelError(INT8_ON_GPU)
        return torch.float32
    return getattr(torch, dtype)


# The model kinds int8 serves: encoders (their tasks are sentiment, classify, embed, rerank, qa
# and recommend); generation (causal-lm, seq2seq-lm) is refused when the job is loaded.
INT8_KINDS = ("sequence-classification", "encoder", "question-answering")


def as_int8(loaded: LoadedModel) -> LoadedModel:
    """`loaded` (float32, CPU) with its model quantized to int8 (models/quantize.py, calibrated on
    a fixed set of texts), the float32 model kept as `reference` for the run's check."""
    import copy

    from torch import nn

    from .quantize import calibration_inputs, describe, quantize_int8

    reference = loaded.model
    model = copy.deepcopy(reference)
    module = model if isinstance(model, nn.Module) else model.model  # a ClassifierAdapter
    limits = [256, int(loaded.tokenizer.model_max_length)]
    pos = getattr(model.config, "max_position_embeddings", None)
    if pos:
        limits.append(int(pos))
    batches = calibration_inputs(loaded.tokenizer, max_length=min(limits), n=128)
    quantize_int8(module, batches, call=lambda b: model(**b))
    loaded.model, loaded.reference, loaded.int8 = model, reference, describe(module)
    return loaded


def read_model_config(path: str) -> dict:
    """The folder's config.json, or a ModelError saying what the folder should hold."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(
            f"model folder {path} does not exist; pass --model a local folder holding a "
            "Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)"
        )
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(
            f"model folder {path} has no config.json; expected a Hugging Face checkpoint "
            "saved with save_pretrained()"
        )
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg} is not valid JSON ({e}); re-export the checkpoint") from None


def check_checkpoint(path: str, kind: str) -> dict:
    """Check, without loading weights, that `path` holds a checkpoint of `kind`; its config."""
    config = read_model_config(path)
    if not _fits(kind, config):
        archs = config.get("architectures") or []
        raise ModelError(
            f"model folder {path} holds {', '.join(archs) or 'an unnamed architecture'}; "
            f"the task needs {KIND_NAMES[kind]}"
        )
    check_tokenizer(path)
    check_weights(path)
    return config


# Files a tokenizer is loaded from: a folder with none of them would get a vocabulary of special
# tokens only (every word [UNK]) from transformers, and wrong results without an error.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
    "tokenizer.model",
)


def check_tokenizer(path: str) -> None:
    """The folder holds a tokenizer, and its tokenizer.json (if any) loads."""
    folder = Path(path)
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not present:
        raise ModelError(
            f"model folder {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the checkpoint the model came from (save_pretrained writes them)"
        )
    if "tokenizer.json" in present:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - whatever the parser says, the file is unusable
            raise ModelError(
                f"{folder / 'tokenizer.json'} does not load ({e}); re-export the tokenizer"
            ) from None


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), without its data."""
    import json as _json

    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = _json.loads(f.read(n))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                raise ValueError(f"the tensors need {8 + n + max(ends)} bytes; it has {size}")
            return header
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelError(
            f"weights file {file} is not readable safetensors ({e}); re-export or re-download it"
        ) from None


def check_weights(path: str) -> None:
    """The folder's safetensors weights exist and their headers parse (never a pickle)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise ModelError(
            f"model folder {path} has no *.safetensors weights"
            + (f" ({', '.join(other)} are pickles, which are never loaded)" if other else "")
            + "; save the model with save_pretrained(safe_serialization=True)"
        )
    for f in files:
        safetensors_header(f)


def load_hf(path: str, kind: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load the checkpoint at `path` as a model of `kind` (tasks/get_task caches it)."""
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    check_checkpoint(path, kind)
    dev = resolve_device(device)
    if dtype == "int8" and kind not in INT8_KINDS:
        raise ModelError(
            f"model.dtype int8 is for encoders; the task needs {KIND_NAMES[kind]}: use "
            "--dtype float32 (or bfloat16 on a GPU)"
        )
    auto = {
        "sequence-classification": AutoModelForSequenceClassification,
        "causal-lm": AutoModelForCausalLM,
        "seq2seq-lm": AutoModelForSeq2SeqLM,
        "encoder": AutoModel,
        "question-answering": AutoModelForQuestionAnswering,
    }[kind]
    try:
        model, info = auto.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            dtype=resolve_dtype(dtype, dev),
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: shapes that do not fit
        raise ModelError(f"cannot load the checkpoint in {path}: {e}") from None
    if info.get("missing_keys") and kind != "encoder":  # an encoder may drop a head, never gain one
        missing = ", ".join(sorted(info["missing_keys"])[:5])
        raise ModelError(
            f"model folder {path} lacks weights the {kind} model needs ({missing}); "
            "it is not a fine-tuned checkpoint for this task"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model folder {path} has no fast tokenizer (tokenizer.json); add one")
    model.to(dev).eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, device=dev, path=path)
    return as_int8(loaded) if dtype == "int8" else loaded
