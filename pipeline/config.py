"""Typed job configuration: frozen dataclasses, validated once at load time.

A job file is TOML with one table per concern; command-line flags override it:

    [input]   paths = ["corpus/"]  text_column = "text"
    [model]   path = "models/sst2"
    [task]    name = "sentiment"   max_tokens = 2048
    [output]  path = "out/"
    [cluster] workers = 2

An unknown table or key, or a value of the wrong type, is a ConfigError that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from . import registry, schemas
from .errors import ConfigError

# A JSON value held as its canonical text (sorted keys), so a config stays hashable; a job file
# may give it as a TOML table or array, or as JSON text.
JsonText = typing.NewType("JsonText", str)

TASKS = tuple(registry.TASKS)
POOLING = ("auto", "mean", "cls", "max")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
# The model kinds (registry) whose tasks generate text: int8 is not for them.
GENERATIVE_KINDS = ("causal-lm", "seq2seq-lm")
ON_LONG = ("truncate", "reject")
EXECUTORS = ("local", "slurm", "mpi", "serial")
OUTPUT_FORMATS = ("parquet", "batch-jsonl")
METRICS = ("cosine", "dot")


@dataclass(frozen=True)
class InputConfig:
    paths: tuple[str, ...] = ()
    """Parquet files, folders (searched recursively for *.parquet) or glob patterns."""
    text_column: str = "text"
    """The column holding the text the task reads."""
    id_column: str | None = None
    """The row-key column. Unset: 'id' when the file has one, else '<real path of the file>:<row>'."""
    keep_columns: tuple[str, ...] = ()
    """Input columns copied into the output, after the task's own columns."""
    text_kind: str = "string"
    """Set from the task, not by hand: messages when task.messages_column names the text column
    (a list of {role, content} structs, read as JSON text); vector when task.embedding_column
    does (a list of floats per row, read as a NumPy array)."""
    shard_rows: int = 100_000
    """Rows per shard, the unit of work and of memory: big files are split by row groups,
    small ones packed together. Applies to files not yet planned in the run folder."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """A local folder: a Hugging Face checkpoint (config.json + weights + tokenizer)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    dtype: str = "auto"
    """auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16, or int8: on CPU, for
    the encoder tasks (sentiment, classify, embed, rerank, qa, recommend), 1.5-1.8x float32's
    speed per model call; each worker checks its first rows against float32
    (models/int8_check.py)."""
    int8_min_agreement: float | None = None
    """dtype int8: the least agreement with float32 on each worker's first 256 rows (the share of
    labels or answers that agree; for embeddings the mean cosine; for rerank the share of score
    pairs in the same order): the run stops when the agreement measured is below it even at its
    95% upper bound (models/int8_check.py). Unset: 0.99."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "sentiment"
    """What to run: one of registry.TASKS (sentiment, translate, generate, embed, classify, qa,
    rerank, recommend)."""
    batch_size: int | None = None
    """Most rows per model call (rows are sorted by length first, so batches pad little); for
    generate, the rows decoding together (continuous batching: a finished row's slot is refilled).
    Unset: 256 for the encoder tasks (sentiment, embed, classify, qa, rerank, recommend: max_tokens
    decides), 32 for generate and translate."""
    max_tokens: int | None = None
    """The encoder tasks: most padded tokens per model call (rows x the batch's longest row), so
    short rows go in big batches and long ones in small. 0: rows alone (batch_size) decide.
    Unset: 2048 on CPU (a batch's activations stay in cache), 16384 on GPU."""
    max_length: int | None = None
    """Longest input in tokens. Unset: the model's own limit."""
    on_long: str = "truncate"
    """What to do with a text over max_length: truncate (and say so in `truncated`) or reject.
    (qa never cuts a context: a long one is read as windows.)"""
    # generate, translate
    max_new_tokens: int = 128
    """Most tokens to generate per row."""
    max_new_tokens_column: str | None = None
    """generate: an integer input column giving each row its own max_new_tokens."""
    do_sample: bool = False
    """generate: sample instead of greedy decoding."""
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k filtering."""
    top_p: float = 1.0
    seed: int = 0
    """With do_sample: each row draws from a generator seeded by (seed, row id), so a rerun, another
    batch size or another worker count gives the same text."""
    stop: tuple[str, ...] = ()
    """generate: strings that end a generation (the text ends before the first one)."""
    # generate: how the prompt is built from a row (pipeline/tasks/prompts.py)
    prompt_template: str | None = None
    """generate: the prompt as a Python format string whose fields name input columns, e.g.
    "Summarise this review of {product}: {text}" ({text}: the text column). Unset: the text."""
    chat: bool = False
    """generate: render the prompt (the text, or the template's result) as the user message with
    the model folder's own chat template (add_generation_prompt), after an optional system one."""
    system: str | None = None
    """generate, with chat: the system message of every row."""
    system_column: str | None = None
    """generate, with chat: an input column giving each row its own system message."""
    messages_column: str | None = None
    """generate: an input column holding each row's whole chat, a list of {role, content} structs,
    rendered with the model folder's chat template (instead of a text column)."""
    requests: bool = False
    """generate: the rows are Batch-API requests (set when the inputs are request .jsonl files):
    the text holds the messages, rendered with the chat template, and each row carries its own
    max_tokens, temperature, top_p, seed, stop and response_format (pipeline/batch_api.py)."""
    reuse_prefix: bool = True
    """generate: rows whose prompts start with the same tokens (16 or more: a system message, a
    template's instructions) share that prefix's KV cache, computed once per worker; the outputs
    are the same either way (false: every row prefilled whole, for comparison)."""
    # generate: what the output must look like (pipeline/models/constraints.py); at most one
    json_schema: JsonText | None = None
    """generate: a JSON schema (an inline table, or JSON text) the output must fit."""
    json_schema_file: str | None = None
    """generate: a JSON file holding the schema (read when the job is loaded)."""
    regex: str | None = None
    """generate: a regular expression the whole output must match."""
    choices: tuple[str, ...] | None = None
    """generate: the output is exactly one of these strings."""
    num_beams: int = 1
    """translate: beam width (1 is greedy)."""
    source_lang: str | None = None
    """translate: source language code, for tokenizers that take one (mBART, NLLB: e.g. eng_Latn)."""
    target_lang: str | None = None
    """translate: target language code, forced as the first generated token where the model uses one."""
    target_lang_column: str | None = None
    """translate: an input column giving each row its own target language."""
    prefix: str = ""
    """translate: text put before every input (T5: 'translate English to German: ')."""
    # classify (zero-shot, with an NLI model)
    labels: tuple[str, ...] | None = None
    """classify: the candidate labels."""
    hypothesis_template: str = "This example is {}."
    """classify: the hypothesis each label is put in; the row's text is the premise."""
    multi_label: bool = False
    """classify: labels independent (each scored entailment vs contradiction) rather than one
    softmax over all labels."""
    # qa (extractive question answering): the text is the context
    question_column: str | None = None
    """qa: an input column holding each row's question."""
    question: str | None = None
    """qa: one question asked of every row (instead of question_column)."""
    doc_stride: int = 128
    """qa: tokens shared by consecutive windows of a context too long for one."""
    max_answer_length: int = 30
    """qa: the longest answer span, in tokens."""
    max_question_length: int = 64
    """qa: the longest question, in tokens (a longer one rejects its row, question_too_long)."""
    handle_impossible: bool = False
    """qa: a SQuAD-2 style model may answer "no answer" (answer null) when the span made of its
    first token scores above every real span."""
    k: int | None = None
    """How many results per row: qa's answers (best first; default 1), recommend's items
    (default 10)."""
    # rerank (cross-encoders)
    text_pair_column: str | None = None
    """rerank: the second text of each pair (the text column holds the first: the query)."""
    candidates: str | None = None
    """rerank: a recommend run folder: each input row (a query) is paired with its items there,
    whose texts task.catalogue holds; the output is one row per (query, item), ranked again."""
    # recommend (two-tower retrieval)
    catalogue: str | None = None
    """recommend: the items, an embed run folder (its vectors reused) or Parquet files, a folder or
    a glob of id + text rows (embedded once, with this job's model, into <output>/_catalogue)."""
    catalogue_id_column: str = "id"
    """recommend: the items' id column (Parquet catalogues)."""
    catalogue_text_column: str = "text"
    """recommend: the items' text column (Parquet catalogues)."""
    catalogue_embedding_column: str | None = None
    """recommend: the Parquet catalogue holds its vectors already, in this column (not embedded
    again; an embed run folder's vectors are used without it)."""
    embedding_column: str | None = None
    """recommend: the queries are vectors already, in this input column (an embed run folder's
    `embedding`), instead of texts to embed."""
    metric: str = "cosine"
    """recommend: cosine (vectors normalised first) or dot (inner product as they are)."""
    exclude_column: str | None = None
    """recommend: an input column holding, per query, a list of item ids never to recommend it
    (items the user has already seen)."""
    filter_column: str | None = None
    """recommend: a column of the queries and of the catalogue: a query gets only items with the
    same value (a null in the query: any item)."""
    block_items: int = 8192
    """recommend: catalogue items scored per block (memory: query rows x block_items scores)."""
    # embed
    pooling: str = "auto"
    """embed: auto (the folder's sentence-transformers pooling, else mean), mean, cls or max."""
    normalize: bool | None = None
    """embed: L2-normalise. Unset: as the folder's sentence-transformers modules say, else no."""

    def input_columns(self) -> dict[str, str]:
        """Input columns this task reads besides the text, each with the option naming it
        (iterates as the column names)."""
        if self.requests:
            from .batch_api import REQUEST_COLUMNS

            return dict.fromkeys(REQUEST_COLUMNS, "a Batch-API request")
        options = ("max_new_tokens_column", "target_lang_column", "system_column",
                   "question_column", "text_pair_column", "exclude_column", "filter_column")  # fmt: skip
        named = {getattr(self, o): f"task.{o}" for o in reversed(options) if getattr(self, o)}
        named = dict(reversed(named.items()))  # the first option naming a column names it
        for f in self.template_fields():
            named.setdefault(f, "task.prompt_template")
        return named

    def template_fields(self) -> tuple[str, ...]:
        """The input columns prompt_template names, but the text ({text}); fields nested in a
        format spec ({price:{width}}) included."""
        if not self.prompt_template:
            return ()
        fields = [f for f in _template_fields(self.prompt_template) if f]
        return tuple(dict.fromkeys(f for f in fields if f != "text"))

    @property
    def constrained(self) -> bool:
        return bool(self.json_schema or self.regex is not None or self.choices)


@dataclass(frozen=True)
class OutputConfig:
    path: str = ""
    """The run folder: results, _rejected/, _manifest/, _SUCCESS."""
    overwrite: bool = False
    """Allow a run with a different config fingerprint to replace what the folder holds."""
    format: str = "parquet"
    """parquet (the run folder), or batch-jsonl: also Batch-API response files, _batch/results.jsonl
    and _batch/errors.jsonl, written from the run folder whenever a run completes it."""
    schema: int = 0
    """The version of the task's output schema written (data_schemas/<task>.v<N>.json). 0: the
    newest for a new run folder, and the one a run folder was started with for a rerun into it
    (a nightly folder keeps one schema when FastServe adds a version). N: that version, for
    readers that expect it."""


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 2
    """Dask worker processes started on this machine (ignored with scheduler_address)."""
    threads_per_worker: int = 0
    """Torch threads per worker. 0: the machine's cores divided by workers."""
    scheduler_address: str | None = None
    """Use a running Dask scheduler (tcp://host:port) instead of starting a LocalCluster."""
    host: str = "127.0.0.1"
    """Interface a started scheduler listens on: loopback unless told otherwise."""
    interface: str | None = None
    """executor = 'slurm' over several nodes: the network interface Dask's scheduler and workers
    listen on and advertise (e.g. ib0). Unset: the address each node's own host name resolves to
    (what Slurm and MPI use), else the first interface with a non-loopback address."""
    executor: str = "local"
    """local: a LocalCluster started here (or scheduler_address). slurm: Dask started inside a
    Slurm job step by dask-jobqueue's SLURMRunner (`srun -n N fastserve infer ...`; what
    `fastserve submit infer` runs): task 0 the scheduler, task 1 this client, the others
    workers. mpi: the same roles from dask-mpi over MPI ranks (`mpiexec -n N fastserve infer ...`).
    serial: no Dask at all, every shard in this process in turn (debugging, small runs)."""


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# -- building from plain dicts (TOML tables, flags) with type checks that name the key ---------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(
            inner, str(inner)
        )
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    if tp is JsonText:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"{where}: key '{key}' is not valid JSON ({e})") from None
        if not isinstance(value, dict | list):
            raise ConfigError(f"{where}: key '{key}' must be a table (or JSON text), got {value!r}")
        return JsonText(json.dumps(value, sort_keys=True, separators=(",", ":")))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}")
        (inner, _) = typing.get_args(tp)
        try:
            return tuple(_coerce(v, inner, key, where) for v in value)
        except ConfigError:
            raise ConfigError(
                f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}"
            ) from None
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
    }[tp]
    if not ok:
        raise ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def build_config(cls: type, table: dict[str, Any], prefix: str, where: str) -> Any:
    """A config dataclass from a table (nested tables for nested dataclasses), every value
    type-checked; an unknown key is an error naming the valid ones (`prefix` + name)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = ", ".join(f"{prefix}{n}" for n in names)
            raise ConfigError(f"{where}: unknown key '{full}'. Valid keys: {valid}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' must be a table ([{full}])")
            kwargs[key] = build_config(tp, value, f"{full}.", where)
        else:
            kwargs[key] = _coerce(value, tp, full, where)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The keys of an infer job file that hold paths (resolved against the job file's folder).
INFER_PATH_KEYS = (
    ("input", "paths"),
    ("model", "path"),
    ("output", "path"),
    ("task", "json_schema_file"),
    ("task", "catalogue"),
    ("task", "candidates"),
)


def read_job_file(path: str | os.PathLike, path_keys=INFER_PATH_KEYS) -> dict[str, Any]:
    """The job file as nested dicts, with relative paths resolved against the file's folder."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"job file {p} does not exist; pass the path of a TOML job file"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job file {p} is not valid TOML: {e}") from None
    base = p.resolve().parent

    def rel(v: Any) -> Any:
        return str(base / v) if isinstance(v, str) and not os.path.isabs(v) else v

    for table_name, key in path_keys:
        table = raw.get(table_name)
        if isinstance(table, dict) and key in table:
            v = table[key]
            table[key] = [rel(x) for x in v] if isinstance(v, list) else rel(v)
    return raw


def load_config(
    cls: type, job_file, overrides: dict | None, path_keys, check, other_tables=()
) -> Any:
    """Build `cls` from an optional job file and flag overrides (nested dicts), then `check` it.
    `other_tables`: tables of the job file that belong to the caller (the CLI's launcher: [slurm]),
    left out here."""
    raw = read_job_file(job_file, path_keys) if job_file else {}
    for name in other_tables:
        raw.pop(name, None)
    where = str(job_file) if job_file else "command line"
    cfg = build_config(cls, _merge(raw, overrides or {}), "", where)
    return check(cfg, where) or cfg


def load_job(
    job_file: str | os.PathLike | None = None, overrides: dict | None = None, other_tables=()
) -> JobConfig:
    """Build and validate an infer JobConfig from an optional job file and flag overrides."""
    return load_config(
        JobConfig, job_file, overrides, INFER_PATH_KEYS, _with_schema_file, other_tables
    )


def _with_schema_file(cfg: JobConfig, where: str) -> JobConfig:
    """Validate; the schema of task.json_schema_file is read into task.json_schema (so the run's
    fingerprint holds the schema itself, and a changed file is a changed config); with
    task.messages_column, that column is the text the rows are read by."""
    t = cfg.task
    if t.messages_column:
        text = {"text_column": t.messages_column, "text_kind": "messages"}
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, **text))
    if t.embedding_column and t.name == "recommend":
        text = {"text_column": t.embedding_column, "text_kind": "vector"}
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, **text))
    if t.json_schema_file:
        if t.json_schema:
            raise ConfigError(f"{where}: give task.json_schema or task.json_schema_file, not both")
        try:
            text = Path(t.json_schema_file).read_text()
        except OSError as e:
            raise ConfigError(
                f"{where}: task.json_schema_file {t.json_schema_file} cannot be read ({e.strerror or e})"
            ) from None
        schema = _coerce(text, JsonText, f"task.json_schema_file ({t.json_schema_file})", where)
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(t, json_schema=schema))
    validate(cfg, where)
    return cfg


def validate(cfg: JobConfig, where: str = "config") -> None:
    """Checks across keys that types alone cannot express. Raises ConfigError naming the key."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: {msg}")

    need(bool(cfg.input.paths), "no input: give --input PATH (or input.paths in the job file)")
    need(
        bool(cfg.model.path) or needs_no_model(cfg.task),
        "no model: give --model DIR (or model.path in the job file)",
    )
    need(bool(cfg.output.path), "no output: give --output DIR (or output.path in the job file)")
    need(
        cfg.task.name in TASKS,
        f"task.name is {cfg.task.name!r}; expected one of {', '.join(TASKS)}",
    )
    need(cfg.input.shard_rows > 0, f"input.shard_rows must be > 0, got {cfg.input.shard_rows}")
    need(
        cfg.task.batch_size is None or cfg.task.batch_size > 0,
        f"task.batch_size must be > 0, got {cfg.task.batch_size}",
    )
    need(
        cfg.task.max_tokens is None or cfg.task.max_tokens >= 0,
        f"task.max_tokens must be >= 0, got {cfg.task.max_tokens}",
    )
    need(
        cfg.task.max_length is None or cfg.task.max_length > 0,
        f"task.max_length must be > 0, got {cfg.task.max_length}",
    )
    need(
        cfg.task.on_long in ON_LONG,
        f"task.on_long is {cfg.task.on_long!r}; expected one of {', '.join(ON_LONG)}",
    )
    need(
        cfg.model.device in DEVICES,
        f"model.device is {cfg.model.device!r}; expected one of {', '.join(DEVICES)}",
    )
    need(
        cfg.model.dtype in DTYPES,
        f"model.dtype is {cfg.model.dtype!r}; expected one of {', '.join(DTYPES)}",
    )
    _validate_int8(cfg, need)
    t = cfg.task
    need(t.max_new_tokens >= 0, f"task.max_new_tokens must be >= 0, got {t.max_new_tokens}")
    need(t.num_beams >= 1, f"task.num_beams must be >= 1, got {t.num_beams}")
    need(t.temperature > 0, f"task.temperature must be > 0, got {t.temperature}")
    need(0 < t.top_p <= 1, f"task.top_p must be in (0, 1], got {t.top_p}")
    need(t.top_k >= 0, f"task.top_k must be >= 0, got {t.top_k}")
    need(
        all(t.stop),
        "task.stop holds an empty string, which would end every generation before its first "
        "token; remove it",
    )
    need(
        t.pooling in POOLING, f"task.pooling is {t.pooling!r}; expected one of {', '.join(POOLING)}"
    )
    _validate_prompting(t, need)
    need(
        (t.name == "classify") == bool(t.labels),
        "task classify needs task.labels (the candidate labels), and only classify takes them",
    )
    if t.name == "classify":
        need(all(t.labels), "task.labels holds an empty label; remove it")
        need(len(set(t.labels)) == len(t.labels), "task.labels names a label twice; remove it")
        try:
            fields = _template_fields(t.hypothesis_template)
        except ValueError:
            fields = None
        need(
            fields == [""],
            f"task.hypothesis_template {t.hypothesis_template!r} must hold exactly one {{}} for "
            "the label (and no other field; a literal brace is {{ or }})",
        )
    _validate_new_tasks(t, need)
    need(
        cfg.cluster.executor in EXECUTORS,
        f"cluster.executor is {cfg.cluster.executor!r}; expected one of {', '.join(EXECUTORS)}",
    )
    need(
        not cfg.cluster.scheduler_address or cfg.cluster.executor == "local",
        f"cluster.scheduler_address is for executor = 'local' (a running Dask scheduler); "
        f"executor {cfg.cluster.executor!r} would not use it: drop one of the two",
    )
    need(
        cfg.output.format != "batch-jsonl" or cfg.task.name == "generate",
        "output.format = batch-jsonl writes chat completions: it is for task generate",
    )
    need(
        cfg.output.format in OUTPUT_FORMATS,
        f"output.format is {cfg.output.format!r}; expected one of {', '.join(OUTPUT_FORMATS)}",
    )
    if cfg.task.name in TASKS and cfg.output.schema:
        name = registry.TASKS[cfg.task.name].schema
        have = schemas.versions(name)
        need(
            cfg.output.schema in have,
            f"output.schema is {cfg.output.schema}; task {cfg.task.name} writes "
            f"{', '.join(f'{name}.v{v}' for v in have)} (data_schemas/): give one of "
            f"{', '.join(map(str, have))}, or 0 (the newest for a new folder; a rerun keeps its folder's)",
        )
    need(cfg.cluster.workers > 0, f"cluster.workers must be > 0, got {cfg.cluster.workers}")
    need(cfg.cluster.threads_per_worker >= 0, "cluster.threads_per_worker must be >= 0")


def _validate_int8(cfg: JobConfig, need) -> None:
    """dtype int8: CPU and an encoder task; int8_min_agreement only with it, in [0, 1]."""
    m, kind = cfg.model, registry.TASKS[cfg.task.name].kind
    encoders = ", ".join(n for n, t in registry.TASKS.items() if t.kind not in GENERATIVE_KINDS)
    if m.dtype == "int8":
        need(
            m.device != "cuda",
            "model.dtype int8 runs on CPU only (fbgemm's int8 kernels); on a GPU use "
            "--dtype bfloat16",
        )
        need(
            kind not in GENERATIVE_KINDS,
            f"model.dtype int8 is for the encoder tasks ({encoders}); task {cfg.task.name} "
            "generates text: use --dtype float32 (or bfloat16 on a GPU)",
        )
    if m.int8_min_agreement is not None:
        need(
            m.dtype == "int8",
            "model.int8_min_agreement is for model.dtype = int8 (the check of int8 against "
            "float32); leave it out",
        )
        need(
            0 <= m.int8_min_agreement <= 1,
            f"model.int8_min_agreement must be in [0, 1], got {m.int8_min_agreement}",
        )


# Which task takes which options (beyond the common ones): an option given to another task is an
# error that says whose it is, rather than silently ignored.
OPTION_TASKS = {
    "question_column": ("qa",),
    "question": ("qa",),
    "handle_impossible": ("qa",),
    "text_pair_column": ("rerank",),
    "candidates": ("rerank",),
    "catalogue": ("recommend", "rerank"),
    "catalogue_embedding_column": ("recommend",),
    "embedding_column": ("recommend",),
    "exclude_column": ("recommend",),
    "filter_column": ("recommend",),
    "k": ("qa", "recommend"),
}


def needs_no_model(t: TaskConfig) -> bool:
    """recommend over vectors alone (queries in task.embedding_column): no model is run."""
    return t.name == "recommend" and bool(t.embedding_column)


def _validate_new_tasks(t: TaskConfig, need) -> None:
    """qa, rerank and recommend: their own options, and only theirs."""
    for key, tasks in OPTION_TASKS.items():
        need(
            t.name in tasks or not getattr(t, key),
            f"task.{key} is for task{'s' if len(tasks) > 1 else ''} {' and '.join(tasks)}, "
            f"not {t.name}",
        )
    need(t.k is None or t.k > 0, f"task.k must be > 0, got {t.k}")
    if t.name == "qa":
        need(
            bool(t.question_column) != bool(t.question),
            "task qa needs the question: task.question_column (a column per row) or "
            "task.question (one for every row), one of the two",
        )
        need(t.question is None or bool(t.question.strip()), "task.question is empty")
        need(t.doc_stride >= 0, f"task.doc_stride must be >= 0, got {t.doc_stride}")
        need(
            t.max_answer_length > 0,
            f"task.max_answer_length must be > 0, got {t.max_answer_length}",
        )
        need(
            t.max_question_length > 0,
            f"task.max_question_length must be > 0, got {t.max_question_length}",
        )
    if t.name == "rerank":
        need(
            bool(t.text_pair_column) != bool(t.candidates),
            "task rerank needs the second text of each pair: task.text_pair_column (a column), "
            "or task.candidates (a recommend run folder: each query's items, their texts in "
            "task.catalogue), one of the two",
        )
        need(
            not t.candidates or bool(t.catalogue),
            "task.candidates needs task.catalogue: the items' Parquet files (id and text)",
        )
    if t.name == "recommend":
        need(
            bool(t.catalogue),
            "task recommend needs task.catalogue: an embed run folder, or Parquet files of "
            "items (id and text)",
        )
        need(
            t.metric in METRICS,
            f"task.metric is {t.metric!r}; expected one of {', '.join(METRICS)}",
        )
        need(t.block_items > 0, f"task.block_items must be > 0, got {t.block_items}")


def _template_fields(template: str) -> list[str]:
    """Every field of a format string, those nested in format specs too ('' for {}); ValueError
    for a string that is not one."""
    out = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"unknown conversion !{conversion} in {{{name}!{conversion}}}")
        out.append(name)
        if spec:
            out += _template_fields(spec)
    return out


def _validate_prompting(t: TaskConfig, need) -> None:
    """prompt_template, chat and the output constraints: generate's, and well formed."""
    used = [k for k in ("prompt_template", "system", "system_column", "json_schema", "regex",
                        "messages_column") if getattr(t, k)] + [
        k for k in ("chat", "choices") if getattr(t, k)]  # fmt: skip
    need(
        not used or t.name == "generate",
        f"task.{used[0] if used else ''} is for task generate, not {t.name}",
    )
    if t.prompt_template:
        try:
            fields = _template_fields(t.prompt_template)
        except ValueError as e:
            raise ConfigError(
                f"task.prompt_template {t.prompt_template!r} is not a format string ({e}); "
                "write fields as {column} and a literal brace as {{ or }}"
            ) from None
        for f in fields:
            need(
                f and not f.isdigit() and not any(c in f for c in ".[]"),
                f"task.prompt_template field {{{f}}} must name an input column plainly "
                "(no indexing, attributes or empty {}); write a literal brace as {{ or }}",
            )
    need(not (t.system and t.system_column), "give task.system or task.system_column, not both")
    need(
        not t.messages_column or not (t.prompt_template or t.chat or t.system or t.system_column),
        "task.messages_column holds whole chats: leave task.prompt_template, task.chat, "
        "task.system and task.system_column out",
    )
    need(
        t.chat or not (t.system or t.system_column),
        "task.system / task.system_column need task.chat = true (a system message is a chat turn)",
    )
    kinds = [k for k in ("json_schema", "regex", "choices") if getattr(t, k)]
    need(
        len(kinds) <= 1,
        f"give one of task.json_schema, task.regex, task.choices (got {', '.join(kinds)})",
    )
    need(t.choices is None or len(t.choices) > 0, "task.choices is empty; give the outputs allowed")
    need(all(t.choices) if t.choices else True, "task.choices holds an empty string; remove it")
    need(t.regex is None or t.regex != "", "task.regex is empty; give a pattern or leave it out")
    if kinds:
        from .models.constraints import grammar_problem

        problem = grammar_problem(t)
        need(problem is None, f"task.{kinds[0]}: {problem}")
