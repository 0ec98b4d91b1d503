"""bei.modeling.pooling / detect / module vs sentence-transformers' own Pooling and encode, same weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import Tokenizer

from bei.errors import ModelError
from bei.modeling.detect import read_model_spec
from bei.modeling.module import build_module
from bei.modeling.pooling import PoolingConfig, PoolingMode, pool
from bei.modeling.spec import ModelSpec
from bei.testing.tiny_models import POOLING_MODES, TEXTS

MODE_SETS: list[tuple[str, ...]] = [(m,) for m in POOLING_MODES] + [
    ("cls", "mean"),
    ("mean", "max", "lasttoken"),
    ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"),
]
_LEGACY = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
LENGTHS = [7, 3, 1, 5, 6]
HIDDEN = 8


def pooling_dict(modes: tuple[str, ...], spelling: str, include_prompt: bool = True) -> dict[str, object]:
    if spelling == "new":
        return {
            "embedding_dimension": HIDDEN,
            "pooling_mode": modes[0] if len(modes) == 1 else list(modes),
            "include_prompt": include_prompt,
        }
    data: dict[str, object] = {"word_embedding_dimension": HIDDEN}
    data.update({flag: mode in modes for mode, flag in _LEGACY.items()})
    data["include_prompt"] = include_prompt
    return data


def masks(side: str, lengths: list[int] = LENGTHS) -> torch.Tensor:
    seq = max(lengths)
    mask = torch.zeros(len(lengths), seq, dtype=torch.int64)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n :] = 1
    return mask


def both(tmp_path: Path, data: dict[str, object]) -> tuple[PoolingConfig, Pooling]:
    """The same 1_Pooling/config.json read by bei and by sentence-transformers."""
    (tmp_path / "config.json").write_text(json.dumps(data))
    return PoolingConfig.read(tmp_path / "config.json"), Pooling.load(str(tmp_path))


def st_pool(st: Pooling, emb: torch.Tensor, mask: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor:
    features: dict[str, object] = {"token_embeddings": emb, "attention_mask": mask}
    if prompt_length is not None:
        features["prompt_length"] = prompt_length
    return st(features)["sentence_embedding"]


# --- config parsing -------------------------------------------------------------------------
@pytest.mark.parametrize("modes", MODE_SETS, ids="+".join)
@pytest.mark.parametrize("spelling", ["legacy", "new"])
def test_config_spellings_agree_with_sentence_transformers(tmp_path: Path, modes: tuple[str, ...], spelling: str) -> None:
    ours, st = both(tmp_path, pooling_dict(modes, spelling, include_prompt=False))
    st_modes = (st.pooling_mode,) if isinstance(st.pooling_mode, str) else tuple(st.pooling_mode)
    assert tuple(m.value for m in ours.modes) == st_modes
    assert ours.include_prompt is st.include_prompt is False


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    assert PoolingConfig.from_dict({"word_embedding_dimension": 8}) == PoolingConfig(modes=(PoolingMode.MEAN,))
    assert PoolingConfig.from_dict({"pooling_mode": ["mean", "cls"]}).modes == (PoolingMode.MEAN, PoolingMode.CLS)
    with pytest.raises(ModelError, match="'median'"):
        PoolingConfig.from_dict({"pooling_mode": "median"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(tmp_path / "config.json")):
        PoolingConfig.read(tmp_path / "config.json")


# --- pool() vs Pooling.forward --------------------------------------------------------------
@pytest.mark.parametrize("modes", MODE_SETS, ids="+".join)
@pytest.mark.parametrize("spelling", ["legacy", "new"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pool_matches_sentence_transformers(tmp_path: Path, modes: tuple[str, ...], spelling: str, side: str) -> None:
    ours, st = both(tmp_path, pooling_dict(modes, spelling))
    torch.manual_seed(0)
    emb = torch.randn(len(LENGTHS), max(LENGTHS), HIDDEN)
    mask = masks(side)
    expected = st_pool(st, emb, mask)
    got = pool(ours, emb, mask)
    assert got.shape == (len(LENGTHS), HIDDEN * len(modes))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # a float mask (as an exported graph may feed it) pools the same
    torch.testing.assert_close(pool(ours, emb, mask.to(torch.float32)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("modes", MODE_SETS, ids="+".join)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt_length", [0, 1, 2])
def test_pool_excludes_prompt_like_sentence_transformers(tmp_path: Path, modes: tuple[str, ...], side: str, prompt_length: int) -> None:
    ours, st = both(tmp_path, pooling_dict(modes, "new", include_prompt=False))
    lengths = [7, 3, 4, 5, 6]  # every row longer than the prompt
    torch.manual_seed(1)
    emb = torch.randn(len(lengths), max(lengths), HIDDEN)
    mask = masks(side, lengths)
    expected = st_pool(st, emb, mask, prompt_length)
    got = pool(ours, emb, mask, torch.full((len(lengths),), prompt_length, dtype=torch.int64))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    if prompt_length:  # the prompt really is left out (the mask itself is untouched)
        assert mask.sum() == sum(lengths)
        included, _ = both(tmp_path, pooling_dict(modes, "new", include_prompt=True))
        with_prompt = pool(included, emb, mask, torch.full((len(lengths),), prompt_length))
        torch.testing.assert_close(with_prompt, st_pool(st, emb, mask))
        if modes != ("lasttoken",) and modes != ("max",):
            assert not torch.allclose(with_prompt, got)


# --- end to end: checkpoint -> read_model_spec -> build_module vs SentenceTransformer.encode --
def tokenize(spec: ModelSpec, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
    config = json.loads((spec.path / "tokenizer_config.json").read_text())
    pad_token = config["pad_token"]
    tok.enable_padding(direction=spec.padding_side, pad_id=tok.token_to_id(pad_token), pad_token=pad_token)
    tok.enable_truncation(spec.max_seq_len)
    encodings = tok.encode_batch(texts)
    batch = {
        "input_ids": torch.tensor([e.ids for e in encodings]),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
    }
    if spec.uses_token_type_ids:
        batch["token_type_ids"] = torch.tensor([e.type_ids for e in encodings])
    return batch


def prompt_length(spec: ModelSpec, prompt: str) -> int:
    """As sentence-transformers measures it: the prompt's tokens, less a trailing special token."""
    tok = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
    encoding = tok.encode(prompt)
    return len(encoding.ids) - (1 if encoding.special_tokens_mask[-1] else 0)


def bei_embed(folder: Path, texts: list[str], prompt: str | None = None) -> tuple[ModelSpec, torch.Tensor]:
    spec = read_model_spec(folder)
    module = build_module(spec)
    inputs = tokenize(spec, [prompt + t for t in texts] if prompt else texts)
    if prompt is not None and spec.pooling is not None and not spec.pooling.include_prompt:
        inputs["prompt_length"] = torch.full((len(texts),), prompt_length(spec, prompt), dtype=torch.int64)
    with torch.no_grad():
        out = module(**inputs)
    if spec.normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return spec, out


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    expected = torch.from_numpy(theirs)
    assert ours.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
    assert cosine.min().item() >= 0.99999, cosine
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[0], ours[1])  # not degenerate


E2E_CASES: dict[str, tuple[str, dict[str, object]]] = {
    **{mode: ("bert", {"pooling": mode}) for mode in POOLING_MODES},
    "cls+mean": ("bert", {"pooling": ["cls", "mean"]}),
    "new:weightedmean": ("bert", {"pooling": "new:weightedmean"}),
    "new:max+cls": ("bert", {"pooling": "new:max+cls"}),
    "dense+normalize": ("bert", {"pooling": ["cls", "mean"], "dense": [(24, "tanh"), (16, "identity")], "normalize": True}),
    "normalize": ("bert", {"pooling": "mean", "normalize": True}),
    "qwen3-lasttoken-left": ("qwen3", {"pooling": "lasttoken", "dense": [(16, "identity")], "normalize": True}),
    "qwen3-mean-right": ("qwen3", {"pooling": "mean", "padding_side": "right"}),
    "roberta-cls": ("roberta", {"pooling": "cls"}),
    "distilbert-weightedmean": ("distilbert", {"pooling": "weightedmean"}),
}


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_module_matches_sentence_transformers(tiny_checkpoint_factory: Callable[..., Path], case: str) -> None:
    model_type, kwargs = E2E_CASES[case]
    folder = tiny_checkpoint_factory(model_type, "embed", **kwargs)
    spec, ours = bei_embed(folder, TEXTS)
    assert spec.normalize is bool(kwargs.get("normalize", False))
    assert len(spec.dense) == len(kwargs.get("dense", ()))  # type: ignore[arg-type]
    assert ours.shape[-1] == spec.embedding_dim
    if spec.normalize:
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("model_type", ["bert", "qwen3"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "weightedmean"])
def test_module_excludes_prompt_like_sentence_transformers(
    tiny_checkpoint_factory: Callable[..., Path], model_type: str, pooling: str
) -> None:
    prompts = {"query": "query: find the passage about "}
    folder = tiny_checkpoint_factory(
        model_type, "embed", pooling=pooling, include_prompt=False, prompts=prompts, default_prompt_name="query"
    )
    spec, ours = bei_embed(folder, TEXTS, prompt=prompts["query"])
    assert spec.prompts == prompts and spec.default_prompt_name == "query"
    assert spec.pooling is not None and spec.pooling.include_prompt is False
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    assert_parity(ours, theirs)


# --- missing pooling files -------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["1_Pooling/config.json", "modules.json"])
def test_missing_pooling_file_is_a_model_error(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, missing: str) -> None:
    folder = shutil.copytree(tiny_checkpoint_factory("bert", "embed"), tmp_path / "model")
    read_model_spec(folder)  # complete: reads
    (folder / missing).unlink()
    with pytest.raises(ModelError) as err:
        read_model_spec(folder)
    assert str(folder / missing) in str(err.value)


@pytest.mark.parametrize(
    "name",
    ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "tokenizer_config.json", "1_Pooling/config.json"],
)
def test_malformed_json_is_a_model_error(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, name: str) -> None:
    folder = shutil.copytree(tiny_checkpoint_factory("bert", "embed"), tmp_path / "model")
    (folder / name).write_text('[{"idx": 0,')
    with pytest.raises(ModelError) as err:
        read_model_spec(folder)
    assert str(folder / name) in str(err.value)
