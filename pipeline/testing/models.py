"""Tiny models and tokenizers built from configs: the tests, benchmarks and the demo never reach
a hub. Each builder writes a Hugging Face folder (config, safetensors, tokenizer) and returns it.
"""

from __future__ import annotations

from pathlib import Path

from . import sample_texts


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


def build_bpe_tokenizer(
    folder: Path, specials: list[str], model_max_length: int = 128, template: bool = False
):
    """A byte-level BPE tokenizer (GPT-2 style) saved as tokenizer.json + tokenizer_config.json.

    `specials[0]` is padding, `specials[1]` bos, `specials[2]` eos; with `template`, every encoded
    text is wrapped as `bos … eos` (BART style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_texts(300), trainer)
    pad, bos, eos = specials[:3]
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=None,
        additional_special_tokens=specials[3:] or None,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(folder)
    return fast


# A small chat template in the style of instruction models: every turn after the eos token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_gpt2(folder: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """A 2-layer GPT-2 causal LM; eos is <|endoftext|>, as in GPT-2. `chat_template`: saved with
    the tokenizer (chat_template.jinja), as instruction models ship one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_bpe_tokenizer(folder, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    if chat_template:
        tok.chat_template = chat_template
        tok.save_pretrained(folder)
    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def build_llama(folder: Path, seed: int = 0, model_type: str = "llama", **config) -> Path:
    """A tiny Llama-family causal LM (model_type llama, mistral or qwen2) with a BPE tokenizer;
    `config` overrides (num_key_value_heads for GQA, tie_word_embeddings, rope_scaling, ...)."""
    import torch
    import transformers

    tok = build_bpe_tokenizer(folder, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    args = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    cfg = getattr(transformers, f"{name}Config")(**{**args, **config})
    getattr(transformers, f"{name}ForCausalLM")(cfg).save_pretrained(folder)
    return folder


def build_bart(folder: Path, seed: int = 0, languages: tuple[str, ...] = ()) -> Path:
    """A 1+1-layer BART translation model; `languages` become special tokens (mBART-style codes)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = build_bpe_tokenizer(folder, ["<pad>", "<s>", "</s>", "<unk>", *languages], template=True)
    torch.manual_seed(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>")}
    cfg = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        decoder_start_token_id=ids["</s>"],
        forced_eos_token_id=None,
        init_std=0.3,
    )
    model = BartForConditionalGeneration(cfg)
    model.generation_config.forced_bos_token_id = None
    model.save_pretrained(folder)
    return folder


def build_encoder(
    folder: Path, seed: int = 0, st_pooling: str | None = None, st_normalize: bool = False
) -> Path:
    """A 2-layer BERT encoder; with `st_pooling`, laid out as a sentence-transformers folder."""
    import json

    import torch
    from transformers import BertConfig, BertModel

    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    BertModel(cfg).save_pretrained(folder)
    if st_pooling:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": 32,
                    "pooling_mode_cls_token": st_pooling == "cls",
                    "pooling_mode_mean_tokens": st_pooling == "mean",
                    "pooling_mode_max_tokens": st_pooling == "max",
                }
            )
        )
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ]
        if st_normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": 48, "do_lower_case": False})
        )
    return folder


def build_fastserve_gpt(folder: Path, seed: int = 0) -> Path:
    """A FastServe GPT checkpoint (fastserve.json + model.safetensors + tokenizer.json)."""
    import torch

    from fastserve.pipeline.models.checkpoint import save_checkpoint
    from fastserve.pipeline.models.gpt import GPT, GPTConfig

    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    tok = build_bpe_tokenizer(tok_dir, ["<pad>", "<|endoftext|>", "<|endoftext|>"])
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(tok), block_size=96, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # wider weights than training's init, so greedy text varies by prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return save_checkpoint(
        folder,
        model,
        tok_dir / "tokenizer.json",
        {"pad": "<pad>", "eos": "<|endoftext|>", "bos": "<|endoftext|>"},
    )


def build_qa(
    folder: Path,
    seed: int = 0,
    texts: list[str] | None = None,
    hidden_size: int = 32,
    max_positions: int = 64,
    initializer_range: float = 0.3,
) -> Path:
    """A 2-layer BERT extractive QA model (BertForQuestionAnswering) with a WordPiece tokenizer
    that gives token_type_ids (question 0, context 1), as BERT's does. `texts`: what the
    tokenizer's vocabulary is learnt from (a vocabulary of whole words for a synthetic corpus);
    default, build_tokenizer's review words. The default wide initializer_range makes spans and
    scores differ from row to row; a model to be trained wants BERT's 0.02."""
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertForQuestionAnswering

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, model_max_length=max_positions)
    if texts is not None:
        tok = tok.train_new_from_iterator(texts, vocab_size=1000)
    cls, sep = (tok.cls_token, tok.cls_token_id), (tok.sep_token, tok.sep_token_id)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
    )
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    tok.init_kwargs["model_input_names"] = tok.model_input_names  # saved with it
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
    )
    BertForQuestionAnswering(cfg).save_pretrained(folder)
    return folder


def fit_qa(folder: Path, examples: list, steps: int = 300, batch: int = 32) -> float:
    """Fine-tune the QA model in `folder` (build_qa) on (question, start, end, context)
    examples, the answer being context[start:end]; saved in place. Returns the last loss."""
    import torch
    from transformers import AutoTokenizer, BertForQuestionAnswering

    tok = AutoTokenizer.from_pretrained(folder)
    model = BertForQuestionAnswering.from_pretrained(
        folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        rows = [examples[(step * batch + j) % len(examples)] for j in range(batch)]
        enc = tok([r[0] for r in rows], [r[3] for r in rows], padding=True, return_tensors="pt")
        starts = [enc.char_to_token(j, r[1], sequence_index=1) for j, r in enumerate(rows)]
        ends = [enc.char_to_token(j, r[2] - 1, sequence_index=1) for j, r in enumerate(rows)]
        loss = model(**enc, start_positions=torch.tensor(starts),
                     end_positions=torch.tensor(ends)).loss  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return loss.item()
