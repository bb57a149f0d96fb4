"""Structured output: a grammar (JSON schema, regex or a list of choices) applied as a per-row
token mask inside the decoding loop, with llguidance.

    grammar = grammar_of(task_cfg)                 # llguidance's grammar text, or None
    rows = RowConstraints(tokenizer, vocab_size, grammar, n_rows)
    rows.mask(logits, live_rows)                   # tokens the grammar forbids: -inf
    rows.advance(row, token)                       # after sampling; True when the grammar is done

Why llguidance (over xgrammar, the other well-kept engine on the package index): it installs
without further packages (xgrammar pulls triton and a TVM runtime), builds a grammar lazily (no
per-schema compile step before the first token: a new schema costs microseconds), and fills the
masks of a whole batch in parallel in Rust (LLExecutor), outside the GIL. Whitespace inside JSON is
not free (compact separators): a random or weak model cannot pad its output with newlines forever.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

# JSON as compact as Python's json.dumps(separators=(",", ":")): no free whitespace.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(task_cfg) -> str | None:
    """The llguidance grammar for a TaskConfig's json_schema / regex / choices (None: none)."""
    from llguidance import LLMatcher

    if task_cfg.json_schema:
        return schema_grammar(task_cfg.json_schema)
    if task_cfg.regex:
        return LLMatcher.grammar_from_regex(task_cfg.regex)
    if task_cfg.choices:
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in task_cfg.choices)
        )
    return None


def schema_grammar(schema_json: str) -> str:
    """The grammar for a JSON schema given as JSON text."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema_json, overrides=_JSON_OPTIONS)


@lru_cache(maxsize=256)
def schema_problem(schema_json: str) -> str | None:
    """Why the engine refuses a JSON schema (a Batch-API row's response_format), or None."""
    from llguidance import LLMatcher

    try:
        grammar = schema_grammar(schema_json)
    except ValueError as e:
        return str(e)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0].strip() if is_error else None


def grammar_problem(task_cfg) -> str | None:
    """Why the engine refuses the task's constraint (checked when the job is loaded), or None."""
    try:
        from llguidance import LLMatcher
    except ImportError:
        return "structured output needs llguidance: pip install llguidance"
    try:
        grammar = grammar_of(task_cfg)
    except ValueError as e:
        return str(e)
    if grammar is None:
        return None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0].strip() if is_error else None


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a Hugging Face fast tokenizer (built once per worker and model)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


class RowConstraints:
    """One grammar matcher per row (None: the row is free), and the batch's token masks."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str | None | list, rows: int):
        """`grammar`: one for every row, or one per row (None: that row is free)."""
        from llguidance import LLExecutor, LLMatcher

        self.grammars = grammar if isinstance(grammar, list) else [grammar] * rows
        self.grammar = None if all(g is None for g in self.grammars) else "some"
        self.matchers: list = [None] * rows
        # a row's matcher is made when the row first decodes
        self._new = lambda g: LLMatcher(_ll_tokenizer(tokenizer, vocab_size), g, log_level=0)
        self.executor = LLExecutor()
        self._bits = torch.arange(32, dtype=torch.int32)
        self._words = (vocab_size + 31) // 32

    def _matcher(self, row: int):
        if self.matchers[row] is None and self.grammars[row] is not None:
            self.matchers[row] = self._new(self.grammars[row])
        return self.matchers[row]

    def mask(self, logits: torch.Tensor, rows: list[int | None]) -> None:
        """Set to -inf, in place, the logits of tokens the grammar forbids next, for each batch
        position j whose row rows[j] has a matcher (other positions are left alone)."""
        if self.grammar is None:
            return
        at = [(j, self._matcher(i)) for j, i in enumerate(rows) if i is not None]
        at = [(j, m) for j, m in at if m is not None]
        if not at:
            return
        bitmask = torch.full((len(at), self._words), -1, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr(
            [(m, k) for k, (_, m) in enumerate(at)],
            bitmask.data_ptr(),
            self._words * 4,
            len(at),
        )
        allowed = ((bitmask[:, :, None] >> self._bits) & 1).flatten(1).bool()
        vocab = logits.shape[-1]
        if vocab > allowed.shape[1]:  # logits wider than the tokenizer: the extra ids never
            allowed = torch.cat(
                [allowed, allowed.new_zeros((len(at), vocab - allowed.shape[1]))], dim=1
            )
        where = torch.tensor([j for j, _ in at], device=logits.device)
        logits[where] = logits[where].masked_fill(~allowed[:, :vocab].to(logits.device), -torch.inf)

    def advance(self, row: int, token: int) -> bool:
        """Feed the row's sampled token to its matcher; True when the grammar is complete (only
        the end of the text may follow)."""
        m = self._matcher(row)
        if m is None:
            return False
        m.consume_token(token)
        return m.is_stopped()

    def complete(self, row: int) -> bool | None:
        """Whether the row's text is a whole sentence of the grammar (None: no grammar)."""
        m = self._matcher(row)
        if m is None:
            return None
        return not m.is_error() and (m.is_accepting() or m.is_stopped())
