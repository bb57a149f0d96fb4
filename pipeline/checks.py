"""What is checked on the client before any worker starts: the model folder can serve the task
(tokenizer present and loadable, weights readable), kept columns do not clash with the task's
output, and the run folder is not inside its own input. Each failure is one clear UserError.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import JobConfig, needs_no_model
from .errors import ConfigError, InputError


def check_job(job: JobConfig) -> None:
    """Everything about `job` that can be checked without its input files."""
    from .tasks import check_model, output_schema

    if job.model.path or not needs_no_model(job.task):
        check_model(job.model, job.task)
    names = [f.name for f in output_schema(job.task.name).fields]
    clash = [c for c in job.input.keep_columns if c in names]
    if clash:
        raise ConfigError(
            f"input.keep_columns: {', '.join(map(repr, clash))} is also an output column of task "
            f"{job.task.name} ({', '.join(names)}); the output cannot hold two columns of one name: "
            "leave it out of --keep-column, or rename it in the input"
        )
    if (job.task.chat or job.task.messages_column) and not _has_chat_template(job.model.path):
        what = "task.chat = true" if job.task.chat else "task.messages_column holds chats"
        raise ConfigError(
            f"{what}, but the model folder {job.model.path} has no chat template "
            "(chat_template in tokenizer_config.json, or chat_template.jinja); leave task.chat "
            "out and build the prompt with task.prompt_template"
        )
    if job.task.name == "classify" and not _nli_labels(job.model.path):
        raise ConfigError(
            f"model folder {job.model.path}: task classify needs an NLI model, whose labels "
            "(config.json label2id) include one starting with 'entail'; this one has none"
        )
    if len(set(job.input.keep_columns)) != len(job.input.keep_columns):
        raise ConfigError(
            f"input.keep_columns names a column twice ({', '.join(job.input.keep_columns)})"
        )


def check_requests(job: JobConfig) -> None:
    """A run over Batch-API request files: generate, on a model with a chat template."""
    if job.task.name != "generate":
        raise ConfigError(
            f"the inputs are Batch-API request files (.jsonl): they are for task generate, "
            f"not {job.task.name}"
        )
    t = job.task
    per_row = ("prompt_template", "chat", "system", "system_column", "messages_column",
               "max_new_tokens_column")  # fmt: skip
    given = [k for k in per_row if getattr(t, k)]
    if given or job.input.keep_columns:
        raise ConfigError(
            "the inputs are Batch-API request files: each request carries its own messages and "
            f"parameters; leave {', '.join(f'task.{k}' for k in given) or '--keep-column'} out"
        )
    if not _has_chat_template(job.model.path):
        raise ConfigError(
            f"the inputs are Batch-API request files (chat messages), but the model folder "
            f"{job.model.path} has no chat template (chat_template in tokenizer_config.json, "
            "or chat_template.jinja); use a chat model"
        )


def check_output_place(job: JobConfig, files: dict[str, str]) -> None:
    """Refuse a run folder that its own inputs would read (now or on the next run)."""
    from .inputs import walked_by

    out = os.path.realpath(job.output.path)
    spec = walked_by(job.output.path, job.input.paths)
    if spec is not None:
        raise InputError(
            f"output folder {job.output.path} lies inside input {spec}: the next run would read "
            "its own results as input; choose an --output outside the input folders"
        )
    for path in files:  # the inputs' real paths (what a run reads may be a copy in _inputs/)
        real = os.path.realpath(path)
        if Path(out) in Path(real).parents:
            raise InputError(
                f"input file {path} lies inside the output folder {job.output.path}: a run must "
                "not read results as input; move it, or choose another --output"
            )


def _has_chat_template(model_dir: str) -> bool:
    """Whether a Hugging Face folder holds a chat template (without loading the tokenizer)."""
    import json

    folder = Path(model_dir)
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def _nli_labels(model_dir: str) -> bool:
    """Whether a Hugging Face folder's labels name an entailment class (other folders: not
    known here, so not refused)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    labels = list((config.get("label2id") or {}).keys()) + list(
        (config.get("id2label") or {}).values()
    )
    return any(str(name).lower().startswith("entail") for name in labels)
