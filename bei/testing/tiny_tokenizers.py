"""The tokenizers of the tiny checkpoints (bei/testing/tiny_models.py): one per family (WordPiece for
BERT, BPE for RoBERTa / XLM-R / ModernBERT / decoders), trained here with the `tokenizers` library on
a small generated corpus, so no download is needed. `save_tokenizer` writes them as a repo does
(tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# sentences for parity tests (bei.testing.tiny_models), also in every tokenizer's training corpus
TEXTS: list[str] = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, with 2,102,650 residents in 2023.",
    "A café in Zürich serves coffee.",
    "I'd like 3 tickets, please; the 7:45 train to Berlin.",
    "Machine learning models turn text into vectors",
    'She said: "it works" -- and it did (mostly).',
    "Numbers like 42, 3.14 and 1,000,000 appear in reports.",
    "embeddings",
    "On Monday, the small company in London hired two engineers and a designer, who will build a new "
    "search engine for old books, maps and letters from the library archive next year.",
    "Why do rivers flow toward the sea, and why does the sea never fill up?",
]

# --- corpus ---------------------------------------------------------------------------------
_SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our team",
    "the small company",
    "John",
    "Maria",
    "the old man",
    "a young engineer",
    "the search engine",
    "this model",
    "the city council",
    "Alice",
    "the river",
    "a student",
    "the doctor",
    "Bob",
    "the library",
    "the government",
]
_VERBS = [
    "reads",
    "writes",
    "builds",
    "finds",
    "sees",
    "likes",
    "sells",
    "buys",
    "opens",
    "closes",
    "visits",
    "answers",
    "explains",
    "computes",
    "ranks",
    "sorts",
    "cleans",
    "paints",
    "plays",
    "hired",
]
_OBJECTS = [
    "a book",
    "the letter",
    "three apples",
    "the report",
    "new maps",
    "an old car",
    "the question",
    "the vectors",
    "a red house",
    "the results",
    "coffee",
    "the music",
    "two tickets",
    "the archive",
    "a small boat",
    "the code",
    "the sentence",
    "a long story",
    "the data",
    "fresh bread",
]
_PLACES = [
    "in Paris",
    "in London",
    "in Berlin",
    "at home",
    "near the sea",
    "in Zürich",
    "in the park",
    "at the café",
    "in New York",
    "on the train",
    "in Tokyo",
    "at school",
    "in France",
    "by the river",
]
_TIMES = [
    "on Monday",
    "yesterday",
    "today",
    "next year",
    "in 2023",
    "at 7:45",
    "every morning",
    "tonight",
    "last week",
    "in summer",
    "before noon",
    "after lunch",
]
_EXTRA = [
    "machine learning",
    "quick brown fox",
    "lazy dog",
    "capital",
    "populous",
    "residents",
    "engineers",
    "designer",
    "archive",
    "letters",
    "embeddings",
    "numbers",
    "reports",
    "mostly",
    "rivers",
    "flow",
    "toward",
    "never",
    "fill",
    "serves",
    "tickets",
    "please",
    "models",
    "turn",
    "text",
    "into",
    "works",
    "naïve",
    "résumé",
    "über",
    "façade",
    "jumps",
    "over",
    "what",
    "why",
    "does",
    "hello",
    "most",
    "with",
    "and",
    "who",
    "will",
    "from",
    "for",
    "search",
    "engine",
    "city",
    "small",
]


def _corpus() -> list[str]:
    rng = random.Random(1234)
    lines: list[str] = []
    for i in range(400):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        kind = i % 6
        if kind == 0:
            line = f"{s.capitalize()} {v} {o} {rng.choice(_PLACES)}."
        elif kind == 1:
            line = f"Why does {s} {v.rstrip('s')} {o} {rng.choice(_TIMES)}?"
        elif kind == 2:
            line = f"{rng.choice(_TIMES).capitalize()}, {s} {v} {rng.randint(0, 9999)} items, {o} and {rng.choice(_OBJECTS)}!"
        elif kind == 3:
            line = f'"{s.capitalize()} {v} {o}," she said; ({rng.randint(1, 99)}.{rng.randint(0, 99)}% of it) -- {rng.choice(_EXTRA)}.'
        elif kind == 4:
            line = " ".join(rng.choice(_EXTRA) for _ in range(rng.randint(3, 12)))
        else:
            line = f"{s} {v} {o} {rng.choice(_PLACES)} {rng.choice(_TIMES)}: {rng.choice(_EXTRA)} {rng.choice(_EXTRA)}"
        lines.append(line)
    return lines + TEXTS


# --- tokenizers -----------------------------------------------------------------------------
# family -> which tokenizer a model type gets
FAMILY = {
    "bert": "wordpiece",
    "distilbert": "wordpiece",
    "electra": "wordpiece",
    "deberta-v2": "wordpiece",  # (DeBERTa-v3 ships a SentencePiece model with the same [CLS] A [SEP] B [SEP] template)
    "nomic_bert": "wordpiece",
    "eurobert": "causal_bpe",
    "gte": "xlmr_unigram",
    "jina_embeddings_v3": "xlmr_unigram",
    "mpnet": "roberta_bpe",  # (MPNet ships WordPiece under <s> A </s></s> B </s> with RoBERTa's special ids)
    "roberta": "roberta_bpe",
    "xlm-roberta": "xlmr_unigram",
    "modernbert": "modernbert_bpe",
    "llama": "causal_bpe",
    "mistral": "causal_bpe",
    "qwen2": "causal_bpe",
    "qwen3": "causal_bpe",
    "gemma2": "causal_bpe",
    "gemma3_text": "causal_bpe",
}

# family -> special tokens by role (ids are the order of `_SPECIALS_ORDER`)
SPECIALS: dict[str, dict[str, str]] = {
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "modernbert_bpe": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "roberta_bpe": {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "mask_token": "<mask>",
    },
    "xlmr_unigram": {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "mask_token": "<mask>",
    },
    "causal_bpe": {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "bos_token": "<|im_start|>"},
}
_SPECIALS_ORDER: dict[str, list[str]] = {
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "modernbert_bpe": ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
    "roberta_bpe": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "xlmr_unigram": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "causal_bpe": ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
}
_VOCAB_SIZE = 700
_TOKENIZERS: dict[str, Tokenizer] = {}


def _template(single: str, pair: str, tok: Tokenizer, specials: Sequence[str]) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in specials])


def _bpe_pieces(corpus: list[str], specials: list[str], normalizer: Any, pre_tokenizer: Any, size: int) -> list[str]:
    """The non-special tokens of a BPE model trained on `corpus`, in id order (alphabet, then merges)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizer
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False))
    return [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if t not in specials]


def _token_id(tok: Tokenizer, token: str) -> int:
    found = tok.token_to_id(token)
    assert found is not None, f"{token!r} is not in the vocabulary"
    return found


def _train(family: str) -> Tokenizer:
    specials = _SPECIALS_ORDER[family]
    corpus = _corpus()
    # The WordPiece and Unigram trainers of `tokenizers` are not deterministic from process to process
    # (hash-map order breaks ties), its BPE trainer is: both vocabularies are derived from a BPE run.
    if family == "wordpiece":
        normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
        pieces = _bpe_pieces(corpus, specials, normalizer, pre_tokenizers.BertPreTokenizer(), 400)
        vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
        for piece in pieces:  # each piece both word-initial and as a "##" continuation
            for token in (piece, "##" + piece):
                vocab.setdefault(token, len(vocab))
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.add_special_tokens(specials)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.post_processor = _template("[CLS]:0 $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", tok, ["[CLS]", "[SEP]"])
    elif family == "xlmr_unigram":
        metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        pieces = _bpe_pieces(corpus, specials, normalizers.NFKC(), metaspace, 500)
        # scores: every piece costs at least 1 (fewest pieces wins), ties go to the earlier (more frequent) piece
        scored = [(t, 0.0) for t in specials] + [(t, -1.0 - i / len(pieces)) for i, t in enumerate(pieces)]
        tok = Tokenizer(models.Unigram(scored, unk_id=specials.index("<unk>"), byte_fallback=False))
        tok.add_special_tokens(specials)
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = metaspace
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.post_processor = _template("<s>:0 $A:0 </s>:0", "<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0", tok, ["<s>", "</s>"])
    else:  # byte-level BPE
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_SIZE, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(corpus, trainer)
        if family == "roberta_bpe":
            tok.post_processor = processors.RobertaProcessing(
                ("</s>", _token_id(tok, "</s>")),
                ("<s>", _token_id(tok, "<s>")),
                trim_offsets=True,
                add_prefix_space=False,
            )
        elif family == "modernbert_bpe":
            tok.post_processor = processors.Sequence(
                [
                    processors.ByteLevel(trim_offsets=True),
                    _template("[CLS]:0 $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1", tok, ["[CLS]", "[SEP]"]),
                ]
            )
        else:  # causal: EOS appended to every text, as Qwen3-Embedding does
            tok.post_processor = processors.Sequence(
                [
                    processors.ByteLevel(trim_offsets=True),
                    _template("$A:0 <|endoftext|>:0", "$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1", tok, ["<|endoftext|>"]),
                ]
            )
    return tok


def trained_tokenizer(model_type: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` for a model type (trained once per family in this process; a copy)."""
    family = FAMILY[model_type]
    if family not in _TOKENIZERS:
        _TOKENIZERS[family] = _train(family)
    return Tokenizer.from_str(_TOKENIZERS[family].to_str())


def save_tokenizer(folder: Path, model_type: str, padding_side: str, model_max_length: int) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    family = FAMILY[model_type]
    tok = trained_tokenizer(model_type)
    specials = SPECIALS[family]
    with_types = model_type in ("bert", "electra", "nomic_bert")
    input_names = ["input_ids", "token_type_ids", "attention_mask"] if with_types else ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side=padding_side,
        model_max_length=model_max_length,
        model_input_names=input_names,
        clean_up_tokenization_spaces=False,
        **specials,
    )
    fast.save_pretrained(str(folder))
    # transformers 5 keeps special tokens in tokenizer_config.json only; repos still ship the map
    special_map = folder / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(json.dumps(specials, indent=2) + "\n")
    return tok
