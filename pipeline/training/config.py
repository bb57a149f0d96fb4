"""The typed config of `fastserve train`: one TOML job file, one table per concern.

[model]      arch = "gpt"  n_layer = 4  n_head = 4  n_embd = 128  block_size = 128
[data]       paths = ["corpus/"]  text_column = "text"  vocab_size = 512  seq_len = 64
[train]      steps = 200  batch_size = 16  lr = 3e-4  warmup_steps = 20
[parallel]   dp = 1  tp = 1  pp = 2  schedule = "1F1B"  microbatches = 4
[checkpoint] every = 50
[output]     path = "runs/gpt"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import registry
from ..config import load_config
from ..errors import ConfigError

ARCHS = tuple(registry.ARCHS)
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
DP_MODES = ("fsdp", "ddp")
PATH_KEYS = (
    ("data", "paths"),
    ("data", "tokenizer"),
    ("output", "path"),
    ("model", "init_from"),
)


@dataclass(frozen=True)
class TrainModelConfig:
    arch: str = "gpt"
    """gpt (a decoder LM), llama (a Llama-family decoder), lstm (embedding -> LSTM layers ->
    softmax over the vocabulary), or classifier (a bidirectional encoder over data.label_column's
    labels, for infer's sentiment). With init_from: taken from the folder."""
    init_from: str | None = None
    """A Hugging Face folder (GPT-2 or Llama family: llama, mistral, qwen2) to fine-tune: the
    architecture, sizes, weights and tokenizer all come from it (the keys below are then not
    used), and export/ is a Hugging Face folder again."""
    n_layer: int = 4
    """Transformer blocks (gpt) or LSTM layers (lstm)."""
    n_head: int = 4
    n_embd: int = 128
    """Width: embedding size (gpt, lstm) and LSTM hidden size."""
    block_size: int = 128
    """Longest sequence the model serves (position table size for gpt)."""
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainDataConfig:
    paths: tuple[str, ...] = ()
    """Parquet files, folders or globs of the corpus (the same corpus schema as inference)."""
    text_column: str = "text"
    tokenizer: str | None = None
    """A tokenizer.json to use. Unset: FastServe trains a byte-level BPE of vocab_size."""
    vocab_size: int = 512
    seq_len: int = 64
    """Tokens per training sequence (documents are packed, eos between them)."""
    label_column: str | None = None
    """The label of each row (any strings), for arch = "classifier"."""
    prompt_column: str | None = None
    """Instruction data: the prompt of each row; with response_column. The loss is on the
    response only; each example is one padded sequence of at most seq_len + 1 tokens."""
    response_column: str | None = None
    messages_column: str | None = None
    """Instruction data as chat messages ([{role, content}, ...], the last the assistant's
    reply), rendered by the tokenizer's chat template (model.init_from's)."""
    val_fraction: float = 0.1
    """Share of sequences held out for validation."""


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 100
    batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks together."""
    grad_accum: int = 1
    """Forward/backward passes per optimizer step (the batch is split between them)."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Clip the gradient norm over all stages and shards (0: off)."""
    seed: int = 0
    eval_every: int = 50
    """Validation loss/perplexity every N steps (and at the end). 0: only at the end."""
    eval_batches: int = 4
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."""
    peak_tflops: float = 0.0
    """Peak of one device for MFU. 0: measured at start with a matmul."""


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B or Interleaved1F1B."""
    microbatches: int = 4
    """Micro-batches per pipeline step (pp > 1)."""
    stages_per_rank: int = 1
    """Pipeline stages per rank; Interleaved1F1B needs 2 or more."""
    dp_mode: str = "fsdp"
    """fsdp (FSDP2) or ddp. DDP inside a pipeline is only correct with 1F1B."""
    timeout_s: float = 120
    """A collective stuck this long ends the job (finite, so a hung rank never hangs the job)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 2
    """Complete checkpoints kept (older ones are removed)."""


@dataclass(frozen=True)
class TrainOutputConfig:
    path: str = ""
    """The run folder: metrics.jsonl, checkpoints/, export/ (what `infer --model` serves)."""


@dataclass(frozen=True)
class TrainJob:
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: TrainOutputConfig = field(default_factory=TrainOutputConfig)


def check(cfg: TrainJob, where: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: {msg}")

    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    need(bool(d.paths), "no corpus: give data.paths (or --data PATH)")
    need(bool(cfg.output.path), "no run folder: give output.path (or --output DIR)")
    need(
        not Path(cfg.output.path).exists() or Path(cfg.output.path).is_dir(),
        f"output.path = {cfg.output.path!r} is a file; expected a run folder (a directory, new "
        "or one an earlier run made): give another path",
    )
    need(m.arch in ARCHS, f"model.arch is {m.arch!r}; expected one of {', '.join(ARCHS)}")
    need(m.n_layer >= 1 and m.n_embd >= 1, "model.n_layer and model.n_embd must be >= 1")
    attention = m.arch in registry.ARCHS and registry.ARCHS[m.arch].attention
    need(
        not attention or m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be a multiple of model.n_head ({m.n_head})",
    )
    need(
        d.seq_len <= m.block_size or bool(m.init_from),  # else checked against the folder's
        f"data.seq_len ({d.seq_len}) must be <= model.block_size ({m.block_size})",
    )
    need(
        t.steps >= 1 and t.batch_size >= 1 and t.grad_accum >= 1,
        "train.steps, train.batch_size, train.grad_accum must be >= 1",
    )
    c = cfg.checkpoint
    need(
        c.every >= 0 and c.keep >= 1,
        f"checkpoint.every ({c.every}) must be >= 0 (0: only at the end and on a signal) and "
        f"checkpoint.keep ({c.keep}) >= 1",
    )
    need(
        p.schedule in SCHEDULES,
        f"parallel.schedule is {p.schedule!r}; expected one of {', '.join(SCHEDULES)}",
    )
    need(
        p.dp_mode in DP_MODES,
        f"parallel.dp_mode is {p.dp_mode!r}; expected one of {', '.join(DP_MODES)}",
    )
    need(
        t.precision in ("auto", "fp32", "bf16"),
        f"train.precision is {t.precision!r}; expected auto, fp32 or bf16",
    )
    per_rank = t.batch_size // (p.dp * t.grad_accum)
    need(
        t.batch_size % (p.dp * t.grad_accum) == 0,
        f"train.batch_size ({t.batch_size}) must divide by parallel.dp * train.grad_accum ({p.dp * t.grad_accum})",
    )
    if p.pp > 1:
        need(
            per_rank % p.microbatches == 0,
            f"the per-rank batch ({per_rank}) must divide by parallel.microbatches ({p.microbatches})",
        )
        need(
            p.schedule != "Interleaved1F1B" or p.stages_per_rank >= 2,
            "parallel.schedule Interleaved1F1B needs parallel.stages_per_rank >= 2",
        )
        need(
            p.schedule == "Interleaved1F1B" or p.stages_per_rank == 1,
            f"parallel.stages_per_rank > 1 needs the Interleaved1F1B schedule, not {p.schedule}",
        )
        stages = p.pp * p.stages_per_rank
        need(
            m.n_layer >= stages,
            f"model.n_layer ({m.n_layer}) must be >= pipeline stages (pp * stages_per_rank = {stages})",
        )
        need(
            not (p.dp > 1 and p.dp_mode == "ddp" and p.schedule != "1F1B"),
            f'DDP inside a pipeline gives wrong gradients with {p.schedule}; use parallel.dp_mode = "fsdp" (or the 1F1B schedule)',
        )
    need(
        d.tokenizer is not None or d.vocab_size >= 300,
        f"data.vocab_size ({d.vocab_size}) leaves no room for merges in a byte-level BPE "
        "(256 bytes + special tokens): use 300 or more",
    )
    need(
        bool(d.prompt_column) == bool(d.response_column),
        "data.prompt_column and data.response_column go together (instruction data)",
    )
    need(
        not (d.messages_column and d.prompt_column),
        "data.messages_column or data.prompt_column + response_column: one kind of instruction data",
    )
    instruct = bool(d.prompt_column or d.messages_column)
    need(
        not instruct or bool(m.init_from or (d.tokenizer and not d.messages_column)),
        "instruction data fine-tunes a model: set model.init_from (a Hugging Face folder; "
        "messages_column uses its chat template)",
    )
    need(
        not instruct or m.arch != "classifier",
        "instruction data trains a language model, not arch = 'classifier'",
    )
    need(
        m.arch != "classifier" or bool(d.label_column),
        'model.arch = "classifier" needs data.label_column',
    )
    if p.tp > 1:
        need(
            attention,
            "tensor parallelism splits attention heads and MLPs: model.arch must be one of "
            + ", ".join(a.name for a in registry.ARCHS.values() if a.attention),
        )
        need(m.n_head % p.tp == 0, f"model.n_head ({m.n_head}) must divide by parallel.tp ({p.tp})")


def load_train_job(job_file=None, overrides: dict | None = None, other_tables=()) -> TrainJob:
    return load_config(TrainJob, job_file, overrides, PATH_KEYS, check, other_tables)
