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
