"""Tiny models and tokenizers built from configs: the tests never reach a hub."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the movie was great terrible plot and bad acting i loved it not good at all wonderful "
    "boring product arrived late works fine would buy again broken on day one excellent value "
    "cheap poor quality happy with this purchase disappointed never again five stars"
).split()


def sample_texts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def build_tokenizer(folder: Path, model_max_length: int = 64):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        sample_texts(200), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(folder)
    return fast


def build_classifier(folder: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier with labels neg/neu/pos, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    labels = ["neg", "neu", "pos", "mixed"][:num_labels]
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        initializer_range=0.3,  # wide weights, so labels and scores differ from row to row
    )
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(folder)
    return folder
