"""generate's prompts, built from a row: the text, a template over input columns, a chat turn.

    prompts, rejected = build_prompts(task_cfg, tokenizer, texts, extra)

- `prompt_template` ("Summarise this review of {product}: {text}") is Python's str.format over
  the row's columns ({text}: the text column); a row whose field is null is rejected (bad_value).
- `chat = true` renders the prompt as the user turn (after `system` / `system_column`) with the
  model folder's own chat template, add_generation_prompt=True, as apply_chat_template does; the
  rendered text is tokenized without adding special tokens again (the template holds them).
- Otherwise the prompt is tokenized as `tokenizer(prompt)` does, special tokens included (so
  greedy output equals model.generate() on that row alone).
"""

from __future__ import annotations

import json

from ..config import TaskConfig
from ..errors import ConfigError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_template(template: str, text: str, row: dict) -> str:
    return template.format(**{**row, "text": text})


def build_prompts(
    cfg: TaskConfig, tokenizer, texts: list[str], extra: dict[str, list], skip=frozenset()
) -> tuple[list[list[int] | None], list[tuple[int, str, str]]]:
    """Token ids of each row's prompt (None where rejected or in `skip`), and the rows it
    rejected (index, reason, detail). Batch-API rows (cfg.requests): the text is the request's
    messages as JSON, rendered with the chat template."""
    n = len(texts)
    prompts: list[str | None] = [None if i in skip else t for i, t in enumerate(texts)]
    rejected: list[tuple[int, str, str]] = []
    if cfg.requests or cfg.messages_column:  # the text is a whole chat, as JSON
        _need_chat_template(tokenizer)
        for i in range(n):
            if prompts[i] is None:
                continue
            chat = json.loads(prompts[i])
            if not chat or not all(
                isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in chat
            ):
                rejected.append(
                    (i, "bad_value", f"{cfg.messages_column}: expected a non-empty list of "
                     "{role, content} with both set")
                )  # fmt: skip
                prompts[i] = None
                continue
            turns = [{"role": m["role"], "content": m["content"]} for m in chat]
            prompts[i] = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
        return _tokenize(tokenizer, prompts, special=False), rejected

    def reject(i: int, detail: str) -> None:
        if prompts[i] is not None:
            rejected.append((i, "bad_value", detail))
            prompts[i] = None

    if cfg.prompt_template:
        fields = cfg.template_fields()
        for i in range(n):
            row = {f: extra[f][i] for f in fields}
            nulls = [f for f, v in row.items() if v is None]
            if nulls:
                reject(i, f"prompt_template field(s) {', '.join(nulls)} null in this row")
            else:
                try:
                    prompts[i] = render_template(cfg.prompt_template, texts[i], row)
                except (ValueError, TypeError, KeyError, IndexError) as e:  # e.g. {n:d} on a str
                    reject(i, f"prompt_template does not fit this row ({type(e).__name__}: {e})")
    if cfg.chat:
        _need_chat_template(tokenizer)
        systems = extra[cfg.system_column] if cfg.system_column else [cfg.system] * n
        for i in range(n):
            if prompts[i] is None:
                continue
            if cfg.system_column and systems[i] is not None and not isinstance(systems[i], str):
                reject(i, f"{cfg.system_column}={systems[i]!r}; expected a string")
                continue
            turns = [{"role": "system", "content": systems[i]}] if systems[i] else []
            turns.append({"role": "user", "content": prompts[i]})
            prompts[i] = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
    return _tokenize(tokenizer, prompts, special=not cfg.chat), rejected


def _need_chat_template(tokenizer) -> None:
    if not has_chat_template(tokenizer):
        raise ConfigError(
            "the prompts are chat turns (task.chat, or Batch-API requests), but the model "
            "folder's tokenizer has no chat template (tokenizer_config.json chat_template, or "
            "chat_template.jinja); use a chat model, or build the prompt with task.prompt_template"
        )


def _tokenize(tokenizer, prompts: list[str | None], special: bool) -> list[list[int] | None]:
    """Token ids of the prompts that are there (special tokens added unless the prompt is a
    rendered chat template, which holds its own)."""
    todo = [i for i, p in enumerate(prompts) if p is not None]
    ids: list[list[int] | None] = [None] * len(prompts)
    if todo:
        enc = tokenizer([prompts[i] for i in todo], add_special_tokens=special)["input_ids"]
        for i, e in zip(todo, enc, strict=True):
            ids[i] = e
    return ids
