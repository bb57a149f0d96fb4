"""Models loaded once per process: Hugging Face folders and FastServe's own checkpoints."""

from __future__ import annotations

from ..errors import ModelError
from ..registry import ARCHS
from .hf import (
    INT8_KINDS,
    KIND_NAMES,
    LoadedModel,
    as_int8,
    check_checkpoint,
    check_tokenizer,
    check_weights,
    load_hf,
    resolve_device,
    resolve_dtype,
)


def check_model_folder(path: str, kind: str) -> None:
    """Fail early, without loading weights, when `path` cannot serve as a model of `kind`."""
    from .checkpoint import is_checkpoint, read_meta

    if is_checkpoint(path):
        arch = read_meta(path)["arch"]
        if arch not in ARCHS or ARCHS[arch].kind != kind:
            raise ModelError(
                f"model folder {path} holds a FastServe {arch} checkpoint; the task needs {KIND_NAMES[kind]}"
            )
        check_tokenizer(path)
        check_weights(path)
        return
    check_checkpoint(path, kind)


def load_model(path: str, kind: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model at `path` as a `kind` (tasks/get_task caches it, keyed on its bytes)."""
    from .checkpoint import is_checkpoint, load_checkpoint

    check_model_folder(path, kind)
    if dtype == "int8" and kind not in INT8_KINDS:
        raise ModelError(
            f"model.dtype int8 is for encoders; the task needs {KIND_NAMES[kind]}: use "
            "--dtype float32 (or bfloat16 on a GPU)"
        )
    if not is_checkpoint(path):
        return load_hf(path, kind, device, dtype)
    dev = resolve_device(device)
    model, tokenizer, meta = load_checkpoint(path, dev, resolve_dtype(dtype, dev))
    if meta["arch"] == "classifier":
        model = ClassifierAdapter(model)
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, device=dev, path=path, backend="fastserve"
    )
    return as_int8(loaded) if dtype == "int8" else loaded


class ClassifierAdapter:
    """A FastServe classifier behind the face the sentiment task expects of a transformers
    sequence classifier: `model(input_ids=..., ...).logits` and `config.id2label`."""

    def __init__(self, model):
        from types import SimpleNamespace

        self.model = model
        c = model.config
        self.config = SimpleNamespace(
            id2label=dict(enumerate(c.labels)),
            num_labels=len(c.labels),
            problem_type=None,
            max_position_embeddings=c.block_size,
        )

    def __call__(self, input_ids, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.model(input_ids))


__all__ = ["LoadedModel", "check_model_folder", "load_model"]
