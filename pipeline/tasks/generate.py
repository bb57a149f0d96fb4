"""generate: prompt in, continuation out, for causal LMs (Hugging Face or FastServe GPT).

Greedy by default; sampling with temperature / top-k / top-p and a per-row seed. The prompt is
the text, a template over the row's columns, or a chat turn (tasks/prompts.py); tokenized as
`tokenizer(prompt)` does (special tokens included), so greedy output equals `model.generate()` on
that row alone. With json_schema / regex / choices, every row decodes under the grammar's token
mask (models/constraints.py) and `parsed_ok` says whether its output is complete.
"""

from __future__ import annotations

from ..config import ModelConfig, TaskConfig
from ..models.decoding import HFCausalLM, Sampling, auto_slots, generate
from ..registry import ARCHS, load_ref
from .base import ModelTask, TaskOutput
from .prompts import build_prompts


def context_length(loaded) -> int:
    cfg = loaded.model.config
    for attr in ("block_size", "max_position_embeddings", "n_positions", "n_ctx"):
        n = getattr(cfg, attr, None)
        if n:
            return int(n)
    return 2048


def eos_ids(loaded) -> set[int]:
    ids = set()
    gen = getattr(loaded.model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


class GenerateTask(ModelTask):
    name = "generate"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        arch = getattr(self.loaded.model, "arch", None)
        if arch in ARCHS:  # a FastServe checkpoint: its decoding adapter from the registry
            adapter = load_ref(ARCHS[arch].decoder)
            self.lm = adapter(self.loaded.model, self.loaded.device)
        else:
            self.lm = HFCausalLM(self.loaded.model, self.loaded.device, task_cfg.reuse_prefix)
        self.context = context_length(self.loaded)
        self.eos = eos_ids(self.loaded)
        self.sampling = Sampling(
            task_cfg.do_sample, task_cfg.temperature, task_cfg.top_k, task_cfg.top_p, task_cfg.seed
        )
        self.grammar = None
        if task_cfg.constrained:
            from ..models.constraints import grammar_of

            self.grammar = grammar_of(task_cfg)
        # the logits' width (a model's vocabulary may be padded past the tokenizer's)
        self.vocab = int(
            getattr(self.loaded.model.config, "vocab_size", 0) or len(self.loaded.tokenizer)
        )

    def _request_rows(self, extra: dict[str, list], limits: list[int], rejected: list) -> tuple:
        """Each Batch-API row's own sampling, stop strings and grammar (from its response_format);
        its max_tokens into `limits`; a row that is no valid request into `rejected`."""
        from dataclasses import replace

        from ..models.constraints import schema_grammar, schema_problem

        samplings, stops, grammars = [], [], []
        for i, error in enumerate(extra["request_error"]):
            s, grammar = self.sampling, self.grammar
            temperature, top_p, seed = (extra[k][i] for k in ("temperature", "top_p", "seed"))
            if temperature is not None:  # 0: greedy, as the Batch API reads it
                s = replace(s, do_sample=temperature > 0, temperature=temperature or 1.0)
            if top_p is not None:
                s = replace(s, top_p=top_p)
            if seed is not None:
                s = replace(s, seed=seed)
            if extra["max_new_tokens"][i] is not None:
                limits[i] = extra["max_new_tokens"][i]
            schema = extra["response_format"][i]
            if error:
                rejected.append((i, "bad_request", error))
            elif schema and (problem := schema_problem(schema)):
                line = extra["line"][i]
                rejected.append((i, "bad_request", f"line {line}: response_format: {problem}"))
            elif schema:
                grammar = schema_grammar(schema)
            samplings.append(s)
            stops.append((*self.cfg.stop, *(extra["stop"][i] or ())))
            grammars.append(grammar)
        return samplings, stops, grammars

    def process(self, texts: list[str], ids: list[str], extra: dict[str, list]) -> TaskOutput:
        import torch

        cfg, tok = self.cfg, self.loaded.tokenizer
        limits = [cfg.max_new_tokens] * len(texts)
        rejected = []
        if cfg.max_new_tokens_column:
            for i, v in enumerate(extra[cfg.max_new_tokens_column]):
                if v is None or not isinstance(v, int) or v < 0:
                    rejected.append(
                        (
                            i,
                            "bad_value",
                            f"{cfg.max_new_tokens_column}={v!r}; expected an integer >= 0",
                        )
                    )
                else:
                    limits[i] = v
        sampling, stops, grammars = self.sampling, cfg.stop, self.grammar
        if cfg.requests:  # Batch-API rows: each with its own parameters
            sampling, stops, grammars = self._request_rows(extra, limits, rejected)
        built, unbuilt = build_prompts(cfg, tok, texts, extra, skip={i for i, _, _ in rejected})
        rejected += unbuilt
        bad = {i for i, _, _ in rejected}
        prompts = [p if p is not None else [] for p in built]
        truncated = [False] * len(texts)
        for i, p in enumerate(prompts):
            # the prompt's room: what max_length allows, and what the context leaves after the
            # new tokens (both bind: prompt + new tokens must fit the model's positions)
            room = self.context - limits[i]
            if cfg.max_length:
                room = min(room, cfg.max_length)
            if len(p) > room and i not in bad:
                if cfg.on_long == "reject" or room <= 0:
                    rejected.append(
                        (
                            i,
                            "too_long",
                            f"prompt of {len(p)} tokens is over its room of {room} "
                            f"(context {self.context} - {limits[i]} new tokens"
                            + (f", max_length {cfg.max_length})" if cfg.max_length else ")"),
                        )
                    )
                    bad.add(i)
                else:  # keep the end of the prompt: it is what the continuation follows
                    prompts[i], truncated[i] = p[len(p) - room :], True
        todo = [i for i in range(len(texts)) if i not in bad]
        results = {}
        constraints = None
        if isinstance(grammars, list):
            grammars = [grammars[i] for i in todo]
            if not any(g is not None for g in grammars):
                grammars = None
        if grammars is not None:
            from ..models.constraints import RowConstraints

            constraints = RowConstraints(tok, self.vocab, grammars, len(todo))
        with torch.inference_mode():  # the whole shard through one continuously batched loop
            outs = generate(
                self.lm,
                tok,
                [prompts[i] for i in todo],
                [ids[i] for i in todo],
                [limits[i] for i in todo],
                [sampling[i] for i in todo] if isinstance(sampling, list) else sampling,
                self.eos,
                [stops[i] for i in todo] if isinstance(stops, list) else stops,
                slots=cfg.batch_size
                or auto_slots(
                    self.loaded.model.config,
                    self.loaded.device,
                    [len(prompts[i]) for i in todo],
                    [limits[i] for i in todo],
                    next(self.loaded.model.parameters()).element_size(),
                    sum(q.numel() * q.element_size() for q in self.loaded.model.parameters()),
                ),
                constraints=constraints,
            )
            results.update(zip(todo, outs, strict=True))
        # parsed_ok: the output is a whole sentence of the row's grammar, ended by the model or
        # by the grammar itself (not cut by max_new_tokens or a stop string)
        complete = [constraints.complete(k) if constraints else None for k in range(len(todo))]
        parsed = {
            i: None if complete[k] is None else complete[k] and results[i].finish_reason == "eos"
            for k, i in enumerate(todo)
        }
        kept = sorted(results)
        return TaskOutput(
            kept=kept,
            columns={
                "generated": [results[i].text for i in kept],
                "finish_reason": [results[i].finish_reason for i in kept],
                "prompt_tokens": [len(prompts[i]) for i in kept],
                "generated_tokens": [len(results[i].tokens) for i in kept],
                "truncated": [truncated[i] for i in kept],
                "parsed_ok": [parsed[i] for i in kept],
            },
            rejected=sorted(rejected),
            tokens=sum(len(prompts[i]) + len(results[i].tokens) for i in kept),
            usage={
                "prompt_tokens": sum(len(prompts[i]) for i in kept),
                "completion_tokens": sum(len(results[i].tokens) for i in kept),
                "unparsed": sum(parsed[i] is False for i in kept),
            },
        )
