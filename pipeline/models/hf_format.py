"""Hugging Face folders <-> FastServe's own decoders, both ways, by name:

    arch, cfg = config_from_hf("models/llama-x")        # config.json -> LlamaConfig / GPTConfig
    load_hf_weights(chunk, "models/llama-x")            # only the tensors `chunk` holds are read
    materialize(chunk, "models/llama-x", device)        # a meta-device stage (TP'd: its slices)
    export_hf(model, tokenizer_folder, "run/export")    # a folder AutoModelForCausalLM loads

Llama-family folders (model_type llama, mistral, qwen2) become models/llama.py's Llama; GPT-2
becomes models/gpt.py's GPT (tanh GELU, fused c_attn split into q/k/v, Conv1D weights transposed).
Weights are read with safetensors, one tensor at a time, from model.safetensors or the shards a
model.safetensors.index.json lists: a pipeline stage reads its own layers only, and a
tensor-parallel rank (apply_tp on the meta-device stage before materialize) only its own rows or
columns of the split weights (safetensors slices). READ counts the bytes read. Never pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def read_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"model.init_from = {str(folder)!r} has no config.json; expected a Hugging Face model "
            "folder (config.json, safetensors weights, tokenizer.json)"
        )
    return json.loads(path.read_text())


def config_from_hf(folder: str | Path):
    """(arch name, FastServe config) for a Hugging Face folder's config.json."""
    c = read_hf_config(folder)
    kind = c.get("model_type")
    if kind in LLAMA_TYPES:
        from .llama import LlamaConfig

        heads = c["num_attention_heads"]
        # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older folders
        # rope_theta and rope_scaling
        rope = dict(c.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        scaling = dict(c.get("rope_scaling") or rope)
        if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = {}
        return "llama", LlamaConfig(
            vocab_size=c["vocab_size"],
            block_size=c.get("max_position_embeddings", 2048),
            n_layer=c["num_hidden_layers"],
            n_head=heads,
            n_kv_head=c.get("num_key_value_heads") or heads,
            n_embd=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            qkv_bias=kind == "qwen2",
            mlp_bias=bool(c.get("mlp_bias", False)),
            model_type=kind,
        )
    if kind == "gpt2":
        from .gpt import GPTConfig

        return "gpt", GPTConfig(
            vocab_size=c["vocab_size"],
            block_size=c.get("n_positions", 1024),
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            bias=True,
            activation="gelu_tanh",
            layer_norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        )
    raise ConfigError(
        f"{folder}/config.json: model_type {kind!r} cannot be trained by FastServe; expected "
        f"gpt2 or a Llama-family model ({', '.join(LLAMA_TYPES)})"
    )


def eos_token(folder: str | Path) -> str:
    """The end-of-sequence token of the folder's tokenizer (what packs documents in training)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise ConfigError(
            f"model.init_from = {str(folder)!r} has no tokenizer.json (a fast tokenizer); "
            "save one with AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        )
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        eos = json.loads(tok_cfg.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return eos
    from tokenizers import Tokenizer

    ids = read_hf_config(folder).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    token = (
        Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(ids[0])
        if ids[0] is not None
        else None
    )
    if token is None:
        raise ConfigError(
            f"{folder}: no eos_token in tokenizer_config.json nor eos_token_id in config.json"
        )
    return token


def build_from_hf(folder: str | Path, device="meta"):
    """(arch, config, model) for the folder, the model's weights not yet there (meta device:
    nothing allocated until a stage takes its part; see materialize)."""
    from ..registry import ARCHS

    arch, cfg = config_from_hf(folder)
    with torch.device(device):
        model = ARCHS[arch].model_class()(cfg)
    return arch, cfg, model


def materialize(chunk: torch.nn.Module, folder: str | Path, device) -> int:
    """A pipeline stage (or whole model) built on the meta device, given real storage on
    `device` and filled from the folder: only its own tensors are read. Tensor parallelism
    applied first (apply_tp on the meta chunk) makes each rank read only its own slices of the
    split weights. Returns bytes read (READ keeps the process's running total)."""
    chunk.to_empty(device=device)
    if hasattr(chunk, "inv_freq"):  # a buffer computed, not stored
        from .llama import rope_frequencies

        chunk.inv_freq = rope_frequencies(chunk.config).to(device)
    tie = getattr(chunk.config, "tie_word_embeddings", False)
    if tie and chunk.wte is not None and chunk.lm_head is not None:
        chunk.lm_head.weight = chunk.wte.weight  # to_empty makes two tensors of one
    return load_hf_weights(chunk, folder)


# -- names: FastServe parameter -> (Hugging Face tensor, how to take it) ----------------------


def _llama_name(name: str) -> str | None:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        i, rest = m.groups()
        rest = (
            rest.replace("attn.", "self_attn.")
            .replace("ln_1.", "input_layernorm.")
            .replace("ln_2.", "post_attention_layernorm.")
        )
        return f"model.layers.{i}.{rest}"
    return {
        "wte.weight": "model.embed_tokens.weight",
        "ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }.get(name)


_GPT2_LAYER = {
    "ln_1.weight": ("ln_1.weight", None),
    "ln_1.bias": ("ln_1.bias", None),
    "ln_2.weight": ("ln_2.weight", None),
    "ln_2.bias": ("ln_2.bias", None),
    "attn.q_proj.weight": ("attn.c_attn.weight", 0),
    "attn.k_proj.weight": ("attn.c_attn.weight", 1),
    "attn.v_proj.weight": ("attn.c_attn.weight", 2),
    "attn.q_proj.bias": ("attn.c_attn.bias", 0),
    "attn.k_proj.bias": ("attn.c_attn.bias", 1),
    "attn.v_proj.bias": ("attn.c_attn.bias", 2),
    "attn.o_proj.weight": ("attn.c_proj.weight", "T"),
    "attn.o_proj.bias": ("attn.c_proj.bias", None),
    "mlp.fc.weight": ("mlp.c_fc.weight", "T"),
    "mlp.fc.bias": ("mlp.c_fc.bias", None),
    "mlp.proj.weight": ("mlp.c_proj.weight", "T"),
    "mlp.proj.bias": ("mlp.c_proj.bias", None),
}


def _gpt2_name(name: str):
    """(HF name without the 'transformer.' prefix, part): part None (as is), 'T' (a Conv1D
    weight, transposed) or 0/1/2 (q, k or v of the fused c_attn)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        i, rest = m.groups()
        hf, part = _GPT2_LAYER[rest]
        return f"h.{i}.{hf}", part
    return {
        "wte.weight": ("wte.weight", None),
        "wpe.weight": ("wpe.weight", None),
        "ln_f.weight": ("ln_f.weight", None),
        "ln_f.bias": ("ln_f.bias", None),
        "lm_head.weight": ("wte.weight", None),  # GPT-2's head is its embedding
    }[name]


# safetensors' dtype names -> bytes per element
_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1}

# Bytes (and tensors or slices) this process has read from Hugging Face folders, all loads
# together: what tests and bench/train_pipeline.py report per rank.
READ = {"bytes": 0, "tensors": 0}


class _Weights:
    """The tensors of a Hugging Face folder, opened lazily file by file (sharded or not); a
    tensor is read whole or as one rectangular slice (safetensors get_slice: only those bytes)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise ConfigError(
                f"{folder} has no model.safetensors (nor an index of shards); FastServe reads "
                "safetensors only, never pickle: convert it with save_pretrained(safe_serialization=True)"
            )
        self.open: dict = {}
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.where

    def _slice(self, name: str):
        from safetensors import safe_open

        file = self.where[name]
        if file not in self.open:
            self.open[file] = safe_open(self.folder / file, "pt")
        return self.open[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def itemsize(self, name: str) -> int:
        return _ITEMSIZE.get(self._slice(name).get_dtype(), 4)

    def get(self, name: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor, or only `region` of it (one slice per dimension)."""
        sl = self._slice(name)
        t = sl[:] if region is None else sl[region]
        n = t.numel() * t.element_size()
        self.bytes_read += n
        READ["bytes"] += n
        READ["tensors"] += 1
        return t


def _source(model, name: str, w: _Weights, prefix: str):
    """Where FastServe's parameter `name` lies in the folder: (HF tensor, transposed, part).
    transposed: a GPT-2 Conv1D weight ((in, out), FastServe's Linear is (out, in)); part 0/1/2:
    q, k or v, a third of the fused c_attn along its last dimension."""
    if model.arch == "gpt":
        hf, part = _gpt2_name(name)
        hf = prefix + hf
        if part == "T":
            return hf, True, None
        if isinstance(part, int):
            return hf, name.endswith("weight"), part
        return hf, False, None
    hf = _llama_name(name)
    if name == "lm_head.weight" and not w.has(hf):
        hf = "model.embed_tokens.weight"  # tied
    if hf is None or not w.has(hf):
        raise ConfigError(f"{w.folder}: no tensor {hf or name!r} for FastServe's {name}")
    return hf, False, None


def _local_region(param) -> tuple[tuple[int, int], ...]:
    """(offset, length) per dimension of the part of `param` this rank holds: all of a plain
    tensor, the local shard of a DTensor (tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return tuple((0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(zip(offset, shape, strict=True))


def _read_param(name: str, param, source, w: _Weights) -> torch.Tensor:
    """This rank's part of FastServe's `param`, read from the folder (only that part)."""
    hf, transposed, part = source
    region = _local_region(param)
    want = tuple(param.shape)
    if transposed:  # HF's tensor is the transpose: swap the region's dimensions back
        region, want = region[::-1], want[::-1]
    if part is not None:  # the fused c_attn: q, k, v side by side along the last dimension
        region = (*region[:-1], (region[-1][0] + part * want[-1], region[-1][1]))
        want = (*want[:-1], 3 * want[-1])
    have = w.shape(hf)
    if have != want:
        raise ConfigError(
            f"{w.folder}: tensor {hf} for {name} has shape {have}, expected {want} from config.json"
        )
    whole = all(o == 0 and n == full for (o, n), full in zip(region, have, strict=True))
    t = w.get(hf, None if whole else tuple(slice(o, o + n) for o, n in region))
    return t.t() if transposed else t


def load_hf_weights(model: torch.nn.Module, folder: str | Path) -> int:
    """Fill `model` (a whole model or a pipeline stage of one: only the parameters it holds are
    read; tensor-parallel DTensor parameters: only this rank's slice of each) from the Hugging
    Face folder; returns the bytes read.

    Every weight is read as a slice, GPT-2's included: q/k/v are column blocks of the fused
    c_attn, and a Conv1D weight's rows are the columns of FastServe's Linear, so a tensor-parallel
    rank reads its rows or columns of the stored tensor. Replicated tensors (embeddings, norms,
    the head, biases of row-split layers) are read whole."""
    from torch.distributed.tensor import DTensor

    folder = Path(folder)
    w = _Weights(folder)
    prefix = "transformer." if model.arch == "gpt" and w.has("transformer.wte.weight") else ""
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight once, by its first name
            t = _read_param(name, param, _source(model, name, w, prefix), w)
            dst = param.to_local() if isinstance(param, DTensor) else param
            if tuple(t.shape) != tuple(dst.shape):
                raise ConfigError(
                    f"{folder}: slice for {name} has shape {tuple(t.shape)}, expected "
                    f"{tuple(dst.shape)}"
                )
            dst.copy_(t)
    return w.bytes_read


def held_bytes(model: torch.nn.Module, folder: str | Path) -> int:
    """Bytes of the folder's tensors `model` holds on this rank (its stage; its slices of
    tensor-parallel weights): what an ideal load reads. Nothing is read but headers."""
    folder = Path(folder)
    w = _Weights(folder)
    prefix = "transformer." if model.arch == "gpt" and w.has("transformer.wte.weight") else ""
    total = 0
    for name, param in model.named_parameters():
        hf = _source(model, name, w, prefix)[0]
        n = 1
        for _, length in _local_region(param):
            n *= length
        total += n * w.itemsize(hf)
    return total


# -- export ------------------------------------------------------------------------------------


def hf_config(model) -> dict:
    """config.json of the Hugging Face model equal to `model`."""
    c = model.config
    if model.arch == "llama":
        family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[c.model_type]
        return {
            "architectures": [f"{family}ForCausalLM"],
            "model_type": c.model_type,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.block_size,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size,
            "head_dim": c.head_dim,
            "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling or None,
            "rope_parameters": {
                "rope_type": "default",
                **c.rope_scaling,
                "rope_theta": c.rope_theta,
            },
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
    if model.arch == "gpt":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_embd": c.n_embd,
            "layer_norm_epsilon": c.layer_norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
    raise ValueError(f"no Hugging Face format for arch {model.arch!r}")


def hf_state(model) -> dict[str, torch.Tensor]:
    """`model`'s weights under Hugging Face's names (and layouts)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if "inv_freq" not in k}
    out: dict[str, torch.Tensor] = {}
    if model.arch == "llama":
        for name, t in sd.items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            out[_llama_name(name)] = t
        return out
    fused: dict[str, list] = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # tied to wte in GPT-2
        hf, part = _gpt2_name(name)
        if part == "T":
            out["transformer." + hf] = t.t().contiguous()
        elif isinstance(part, int):
            fused.setdefault("transformer." + hf, [None] * 3)[part] = t
        else:
            out["transformer." + hf] = t
    for hf, parts in fused.items():  # q, k, v back into c_attn (Conv1D: (in, 3 * out))
        out[hf] = (
            torch.cat(parts, dim=0).t().contiguous() if parts[0].dim() == 2 else torch.cat(parts)
        )
    return out


def export_hf(
    model, tokenizer_from: str | Path | None, folder: str | Path, extra: dict | None = None
) -> Path:
    """A folder `AutoModelForCausalLM.from_pretrained` loads: config.json, model.safetensors,
    generation_config.json and the tokenizer files of `tokenizer_from` (the folder the run was
    initialised from)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model.arch == "gpt" and not model.config.tie_word_embeddings:
        raise ValueError("a GPT with an untied head has no GPT-2 equivalent")
    save_file(hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model)
    src = Path(tokenizer_from) if tokenizer_from else None
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        original = read_hf_config(src) if (src / "config.json").exists() else {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in original:
                config[key] = original[key]
    config["fastserve"] = extra or {}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if not (tmp / "generation_config.json").exists():
        gen = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
