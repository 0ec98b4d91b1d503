"""bei's packed causal decoders (bei/modeling/packed/decoders.py) against transformers, in fp32 on the CPU.

For every (model_type, task) bei/testing/tiny_models.py makes for Llama, Mistral, Qwen2, Qwen3 and Gemma2
(embed with last-token pooling, rerank, classify, ner) the packed module's output on a padded batch
equals `bei.build.reference_outputs` of the transformers EngineModule (eager attention) on the same
weights, and the batch packed equals each row run alone. The tiny checkpoints pad on the left (as
causal checkpoints do); one reranker pads on the right. Beyond the grid: sliding windows shorter than
the texts (Gemma2 with strong attention soft-capping, Mistral, Qwen2 with use_sliding_window), llama3
rope scaling (in the legacy rope_theta / rope_scaling spelling) and linear, Llama's attention and MLP
biases, random norm weights and biases (the tiny ones are 0 or 1), pad token ids inside rows, a model
without pad_token_id, and the configurations the module refuses.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bei.backend import Batch
from bei.buildsteps.samples import reference_outputs
from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.modeling.module import EngineModule, auto_class, build_module
from bei.modeling.packed.decoders import DECODERS as PACKED_DECODERS
from bei.modeling.packed.model import PackedEngineModule, build_packed_module, load_hf_weights, num_labels
from bei.modeling.packed.weights import read_hf_state
from bei.modeling.spec import ModelSpec
from bei.testing.tiny_models import DECODERS, SUPPORTED, TEXTS, edit_config
from bei.text.tokenizer import TokenizerRuntime

MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999
ALONE_ABS_DIFF = 1e-5  # the batch packed vs each row alone: the same arithmetic but for reduction order
PAIRS = [(TEXTS[i], TEXTS[(i * 5 + 3) % len(TEXTS)]) for i in range(len(TEXTS))]
TASKS = ("embed", "rerank", "classify", "ner")
# transformers rebuilds the qwen2 tokenizer whatever tokenizer.json says (see bei/testing/inproc_server.py)
SYNC_TOKENIZER = ("qwen2",)


@dataclass(frozen=True)
class Edit:
    """How a case's checkpoint departs from the tiny one: config.json keys (None removes one), a model
    re-drawn from the edited config (`remake`: for keys that change which weights there are), weights
    scaled by key part, and noise on every 1-D tensor (norm weights, biases: the tiny ones are 0 or 1)."""

    config: dict[str, Any] = field(default_factory=dict)
    remake: bool = False
    scale: dict[str, float] = field(default_factory=dict)
    jitter: float = 0.0


@dataclass(frozen=True)
class Case:
    """A tiny checkpoint of `model_type` for `task`, made with `kwargs`, changed by `edit`."""

    name: str
    model_type: str
    task: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    edit: Edit | None = field(default=None, hash=False, compare=False)

    def __str__(self) -> str:
        return self.name


def _case(model_type: str, task: str, variant: str = "", edit: Edit | None = None, **kwargs: Any) -> Case:
    if task == "embed":
        kwargs.setdefault("pooling", "lasttoken")
    return Case(f"{model_type}-{task}" + (f"-{variant}" if variant else ""), model_type, task, kwargs, edit)


GRID = [_case(mt, task) for mt in DECODERS for task in TASKS if task in SUPPORTED[mt]]
RIGHT_PADDED = _case("qwen3", "rerank", "right-padding", padding_side="right")
LLAMA3_ROPE = {
    "rope_parameters": None,  # the legacy spelling, as real Llama 3.1 checkpoints
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16},
}  # fmt: skip
LINEAR_ROPE = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}
LLAMA_BIASES = {"attention_bias": True, "mlp_bias": True}
JITTER = Edit(jitter=0.2)
VARIANTS = [
    RIGHT_PADDED,
    _case("llama", "embed", "rope-llama3", Edit(config=LLAMA3_ROPE)),
    _case("llama", "rerank", "rope-linear", Edit(config=LINEAR_ROPE)),
    _case("llama", "classify", "biases", Edit(config=LLAMA_BIASES, remake=True, jitter=0.2)),
    _case("llama", "embed", "jitter", JITTER),
    _case("mistral", "ner", "jitter", JITTER),
    _case("qwen2", "rerank", "jitter", JITTER),
    _case("qwen3", "classify", "jitter", JITTER),
    _case("gemma2", "ner", "jitter", JITTER),
    _case("gemma3_text", "embed", "jitter", JITTER),
]
# q and k 20x larger: attention logits of a few units, which a soft cap of 2 bends (the tiny models' are ~0.01)
SOFTCAP = Edit(config={"sliding_window": 4, "attn_logit_softcapping": 2.0}, scale={"q_proj": 20.0, "k_proj": 20.0})
QWEN_WINDOW = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None}
# a sliding window shorter than most texts: (case, the window)
SLIDING = [
    (_case("gemma2", "embed", "window-softcap", SOFTCAP), 4),
    (_case("gemma2", "classify", "window", Edit(config={"sliding_window": 3})), 3),
    (_case("mistral", "rerank", "window", Edit(config={"sliding_window": 5})), 5),
    (_case("qwen2", "ner", "window", Edit(config=QWEN_WINDOW)), 4),
    # EmbeddingGemma's bidirectional window: transformers attends |i - j| <= sliding_window // 2
    (_case("gemma3_text", "embed", "window", Edit(config={"sliding_window": 6})), 3),
]


@dataclass
class Engines:
    spec: ModelSpec
    reference: EngineModule
    packed: PackedEngineModule
    batch: Batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _apply_edit(folder: Path, task: str, edit: Edit) -> None:
    edit_config(folder, edit.config)
    torch.manual_seed(1)
    if edit.remake:
        import transformers

        model = auto_class(Task(task)).from_config(transformers.AutoConfig.from_pretrained(str(folder)))
        model.save_pretrained(str(folder))
    state = load_file(folder / "model.safetensors")
    for key, value in state.items():
        value = value * math.prod(factor for part, factor in edit.scale.items() if part in key)
        state[key] = value + edit.jitter * torch.randn_like(value) if value.dim() == 1 else value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _encode(spec: ModelSpec, folder: Path) -> Batch:
    tokenizer = TokenizerRuntime(folder / "tokenizer.json", spec.max_seq_len, chat_template=spec.chat_template)
    items: list[str] | list[tuple[str, str]] = PAIRS if spec.task in (Task.RERANK, Task.CLASSIFY) else TEXTS
    return Batch.pad([tokenizer.encode(item, truncate=True) for item in items], tokenizer.pad_id, spec.padding_side)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Engines]:
    """`engines(case)`: the case's checkpoint, its transformers reference and packed module, and its batch."""
    from bei.testing.inproc_server import sync_tokenizer_json

    cache: dict[str, Engines] = {}

    def get(case: Case) -> Engines:
        if case.name not in cache:
            folder = tiny_checkpoint_factory(case.model_type, case.task, **case.kwargs)
            if case.model_type in SYNC_TOKENIZER or case.edit:  # shared folders: change a copy
                folder = Path(shutil.copytree(folder, tmp_path_factory.mktemp(case.name), dirs_exist_ok=True))
                if case.edit:
                    _apply_edit(folder, case.task, case.edit)
                if case.model_type in SYNC_TOKENIZER:
                    sync_tokenizer_json(folder)
            spec = read_model_spec(folder)
            cache[case.name] = Engines(spec, build_module(spec), build_packed_module(spec), _encode(spec, folder))
        return cache[case.name]

    return get


def _run_packed(module: PackedEngineModule, batch: Batch, rows: slice = slice(None)) -> np.ndarray:
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a[rows])

    with torch.no_grad():
        out = module.forward_padded(
            tensor(batch.input_ids), tensor(batch.attention_mask), tensor(batch.token_type_ids),
            tensor(batch.prompt_length), left_padded=batch.left_padded,
        )  # fmt: skip
    return out.float().numpy()


def _real(out: np.ndarray, batch: Batch, task: str) -> np.ndarray:
    """Per-token outputs at the real positions only ([tokens, labels]); others as they are."""
    return out[batch.attention_mask.astype(bool)] if task == "ner" else out


def assert_matches(got: np.ndarray, want: np.ndarray, what: str, tol: float = MAX_ABS_DIFF) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.2e} > {tol:.0e}"
    flat_got, flat_want = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
    if flat_got.shape[1] > 1:
        norms = np.linalg.norm(flat_got, axis=1) * np.linalg.norm(flat_want, axis=1)
        cosine = (flat_got * flat_want).sum(1) / norms
        assert cosine.min() >= MIN_COSINE, f"{what}: min cosine {cosine.min():.7f} (row {cosine.argmin()})"


def _check_against_reference(e: Engines, task: str) -> np.ndarray:
    want = _real(reference_outputs(e.reference, e.batch), e.batch, task)
    got = _real(_run_packed(e.packed, e.batch), e.batch, task)
    assert_matches(got, want, "packed vs transformers")
    assert np.abs(want).max() > 1e-2, "the reference outputs are all but zero: the comparison says nothing"
    return got


def _check_rows_alone(e: Engines, task: str) -> None:
    batched = _run_packed(e.packed, e.batch)
    for row in range(len(e.batch.lengths)):
        alone = _run_packed(e.packed, e.batch, slice(row, row + 1))
        if task == "ner":  # the same width and padding side: the row's real positions line up
            real = e.batch.attention_mask[row].astype(bool)
            got, want = alone[0][real], batched[row][real]
        else:
            got, want = alone[0], batched[row]
        assert_matches(got[None], want[None], f"row {row} alone vs in the batch", ALONE_ABS_DIFF)


@pytest.mark.parametrize("case", GRID + VARIANTS, ids=str)
def test_packed_decoder_equals_transformers(case: Case, engines: Callable[[Case], Engines]) -> None:
    e = engines(case)
    assert e.batch.left_padded == (case is not RIGHT_PADDED), "tiny causal checkpoints pad on the left"
    assert len(set(e.batch.lengths.tolist())) > 1, "the batch needs padding to test anything"
    _check_against_reference(e, case.task)
    _check_rows_alone(e, case.task)


@pytest.mark.parametrize(("case", "window"), SLIDING, ids=[str(c) for c, _ in SLIDING])
def test_sliding_window(case: Case, window: int, engines: Callable[[Case], Engines]) -> None:
    e = engines(case)
    assert int(e.batch.lengths.max()) > 3 * window, "the texts must be longer than the window"
    got = _check_against_reference(e, case.task)
    _check_rows_alone(e, case.task)
    assert case.edit is not None
    knobs = ["sliding_window"] + (["attn_logit_softcapping"] if "attn_logit_softcapping" in case.edit.config else [])
    for knob in knobs:  # each is exercised: without it the module answers otherwise
        assert np.abs(_packed_without(e, case, knob) - got).max() > 1e-3, f"{knob} changes nothing"


def _packed_without(e: Engines, case: Case, key: str) -> np.ndarray:
    """The packed module's outputs on the case's batch, config.json's `key` set to null."""
    config = json.loads((e.spec.path / "config.json").read_text())
    body = PACKED_DECODERS[case.model_type]({**config, key: None}, e.spec.task, num_labels(e.spec))
    load_hf_weights(body, e.spec.path)
    return _real(_run_packed(PackedEngineModule(e.spec, body).eval(), e.batch), e.batch, case.task)


@pytest.mark.parametrize("case", [_case("llama", "classify"), RIGHT_PADDED], ids=str)
def test_pad_token_inside_a_row(case: Case, engines: Callable[[Case], Engines]) -> None:
    """transformers scores the last token that is not pad_token_id, wherever pad ids stand."""
    e = engines(case)
    pad = e.packed.body.config.pad_token_id  # type: ignore[union-attr]
    assert pad is not None
    ids, mask = e.batch.input_ids.copy(), e.batch.attention_mask.copy()
    for row in range(ids.shape[0]):
        real = np.flatnonzero(mask[row])
        ids[row, real[len(real) // 2]] = pad  # one in the middle of every row
        if row % 2 == 0 and len(real) > 3:  # and real trailing pad tokens in some rows
            ids[row, real[-2:]] = pad
    batch = Batch(ids, mask, e.batch.token_type_ids, e.batch.prompt_length, e.batch.lengths, e.batch.left_padded)
    want = reference_outputs(e.reference, batch)
    got = _run_packed(e.packed, batch)
    assert_matches(got, want, "packed vs transformers, pad ids inside rows")
    assert np.abs(got - _run_packed(e.packed, e.batch)).max() > 1e-3, "the pad ids change nothing"


def _spellings(state: dict[str, torch.Tensor], tied: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The same weights as XModel, XFor{Sequence,Token}Classification and XForCausalLM checkpoints spell them."""
    bare = {k.removeprefix("model."): v for k, v in state.items()}
    prefixed = {("model." + k if not k.startswith("score.") else k): v for k, v in bare.items()}
    embeddings = bare["embed_tokens.weight"]
    causal = {**prefixed, "lm_head.weight": embeddings, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    if tied:  # tied embeddings saved under lm_head only
        causal.pop("model.embed_tokens.weight")
    return {"bare": bare, "prefixed": prefixed, "causal-lm": causal}


@pytest.mark.parametrize("case", [_case("qwen3", "embed"), _case("gemma2", "rerank"), _case("llama", "ner")], ids=str)
def test_checkpoint_key_spellings_load(case: Case, engines: Callable[[Case], Engines]) -> None:
    e = engines(case)
    want = _run_packed(e.packed, e.batch)
    config = json.loads((e.spec.path / "config.json").read_text())
    tied = case.model_type == "gemma2"
    for name, state in _spellings(read_hf_state(e.spec.path), tied).items():
        if e.spec.task is Task.EMBED:  # a classifier's checkpoint embeds too: its head is dropped
            state = {**state, "score.weight": torch.zeros(2, e.spec.hidden_size)}
        body = PACKED_DECODERS[case.model_type]({**config, "tie_word_embeddings": tied}, e.spec.task, num_labels(e.spec))
        body.load_state_dict(body.convert_hf_state(state), strict=True)
        got = _run_packed(PackedEngineModule(e.spec, body).eval(), e.batch)
        assert np.array_equal(got, want), f"{name}: other outputs"


def test_no_pad_token_id_scores_each_rows_last_token(engines: Callable[[Case], Engines]) -> None:
    """Without pad_token_id transformers scores the last position, and takes one row at a time."""
    e = engines(_case("llama", "classify", "no-pad-id", Edit(config={"pad_token_id": None})))
    assert e.packed.body.config.pad_token_id is None  # type: ignore[union-attr]
    got = _run_packed(e.packed, e.batch)
    for row in range(len(e.batch.lengths)):
        real = e.batch.attention_mask[row].astype(bool)
        alone = Batch(e.batch.input_ids[row : row + 1, real], e.batch.attention_mask[row : row + 1, real],
                      e.batch.token_type_ids[row : row + 1, real], e.batch.prompt_length[row : row + 1],
                      e.batch.lengths[row : row + 1])  # fmt: skip
        assert_matches(got[row : row + 1], reference_outputs(e.reference, alone), f"row {row}")


TINY = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
REFUSED = [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, Task.EMBED, "rope_scaling"),
    ("llama", {"rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, Task.EMBED, "rope_scaling"),
    ("qwen3", {"head_dim": 4}, Task.SPARSE, "sparse"),
    ("gemma2", {"use_bidirectional_attention": True}, Task.EMBED, "use_bidirectional_attention"),
    ("llama", {"hidden_act": "quick_gelu"}, Task.NER, "hidden_act"),
    ("gemma2", {"layer_types": ["full_attention"]}, Task.EMBED, "layer_types"),
]


@pytest.mark.parametrize(("model_type", "config", "task", "match"), REFUSED, ids=[r[-1] for r in REFUSED])
def test_unsupported_configuration_is_a_model_error(model_type: str, config: dict[str, Any], task: Task, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        PACKED_DECODERS[model_type]({"model_type": model_type, **TINY, **config}, task, 2)


@pytest.mark.parametrize("case", [c for c in GRID if c.task == "embed"], ids=str)
def test_linears_reading_one_input_are_fused(case: Case, engines: Callable[[Case], Engines]) -> None:
    """q, k and v are one GEMM (GQA: q's heads then k's and v's), gate and up another: one FP8
    quantize of each input instead of three and two. Their outputs equal transformers' separate ones."""
    import transformers

    e = engines(case)
    body = e.packed.body
    state = body.state_dict()
    assert not [k for k in state if any(p in k for p in (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj."))]
    c = body.config
    qkv = state["layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((c.heads + 2 * c.kv_heads) * c.head_dim, c.hidden_size)
    assert state["layers.0.mlp.gate_up_proj.weight"].shape == (2 * c.intermediate_size, c.hidden_size)
    reference = e.reference.model if hasattr(e.reference, "model") else e.reference
    hf = next(m for m in reference.modules() if isinstance(m, transformers.PreTrainedModel))
    hf_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    want = torch.cat([hf_state[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
    torch.testing.assert_close(qkv, want, rtol=0, atol=0)
