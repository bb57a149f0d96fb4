"""The reference answers: Hugging Face transformers run on the same model, one row at a time."""

from __future__ import annotations


def pipeline_sentiment(model_dir, texts, truncation=False, max_length=None):
    """[(label, score, {label: prob})] from pipeline("text-classification"), row by row."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    kwargs = {"truncation": True, "max_length": max_length} if truncation else {}
    out = []
    for t in texts:
        top = pipe(t, **kwargs)[0]
        every = pipe(t, top_k=None, **kwargs)
        out.append((top["label"], top["score"], {d["label"]: d["score"] for d in every}))
    return out


def hf_generate(model_dir, prompts, max_new_tokens, **kwargs):
    """[(new token ids up to eos, exclusive)] from `model.generate()` called one row at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eos = model.generation_config.eos_token_id
    out = []
    for p, n in zip(prompts, max_new_tokens, strict=True):
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(
                **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs
            )
        new = seq[0, enc["input_ids"].shape[1] :].tolist()
        out.append(new[: new.index(eos)] if eos in new else new)
    return out


def hf_generate_constrained(model_dir, prompt_ids, max_new_tokens, grammar):
    """[new token ids up to eos] from `model.generate()` one row at a time, greedy, with a logits
    processor that applies llguidance's mask for `grammar` (the engine's own matcher, fed each
    token the model chose) — the reference for structured output. `grammar` None: no mask (for
    prompts given as token ids, e.g. a chat template's)."""
    import llguidance
    import llguidance.hf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eos = model.generation_config.eos_token_id
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size)
    out = []
    for ids, n in zip(prompt_ids, max_new_tokens, strict=True):
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0) if grammar else None
        start = len(ids)

        def processor(input_ids, scores, matcher=matcher, start=start):
            if input_ids.shape[1] > start:
                matcher.consume_token(int(input_ids[0, -1]))
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            bits = matcher.compute_logit_bias()  # one byte per token: 200 allowed, 0 not
            allowed[: len(bits)] = torch.tensor(list(bits)[: scores.shape[-1]]) > 0
            return scores.masked_fill(~allowed, -torch.inf)

        with torch.no_grad():
            seq = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                logits_processor=LogitsProcessorList([processor] if matcher else []),
            )
        new = seq[0, start:].tolist()
        out.append(new[: new.index(eos)] if eos in new else new)
    return out


def hf_translate(model_dir, texts, num_beams=1, max_new_tokens=20, target_langs=None):
    """[translation token ids, specials removed] from `model.generate()` one row at a time."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    out = []
    for i, t in enumerate(texts):
        enc = tok(t, return_tensors="pt")
        kwargs = {}
        if target_langs:
            kwargs["forced_bos_token_id"] = tok.convert_tokens_to_ids(target_langs[i])
        with torch.no_grad():
            seq = model.generate(
                **enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, **kwargs
            )
        out.append([x for x in seq[0].tolist() if x not in tok.all_special_ids])
    return out


def hf_embed(model_dir, texts, pooling="mean", normalize=False, max_length=None):
    """Pooled embeddings from AutoModel, one row at a time."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        v = {"mean": h.mean(0), "cls": h[0], "max": h.max(0).values}[pooling]
        if normalize:
            v = v / v.norm()
        out.append(v.tolist())
    return out
