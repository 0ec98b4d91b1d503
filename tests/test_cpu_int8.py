"""The CPU's W8A8 engine (`quantization_type: int8` with `cpu_precision: bf16`, the torch target on the
CPU; bei/modeling/packed/int8.py): `Int8Linear` against its arithmetic done by hand, the calibration
hooks, the search over kinds of layer, the plans on faked hosts, and one real build of
all-MiniLM-L6-v2 on this machine: built, served and compared with sentence-transformers where the CPU
has bf16 units, refused with the field's name where it has not."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bei.build import build_engine, cpu_candidates, plan_build
from bei.config import load_config, parse_config
from bei.engine.manifest import Manifest, read_manifest
from bei.errors import ConfigError, EngineError
from bei.hardware import Host, detect_host
from bei.modeling.packed.bf16 import Bf16Linear
from bei.modeling.packed.int8 import (
    SMOOTHING_ALPHA,
    Int8Linear,
    Trial,
    choose_int8_kinds,
    chosen_kinds,
    group_of,
    groups_of,
    project,
)
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.observe import input_amax
from bei.progress import Progress
from bei.targets.base import cpu_only_int8
from bei.targets.registry import check_compatible
from bei.testing.inproc_server import config_for, serve_engine
from tests.servers import REPO_ROOT

TORCH = {"onnxruntime": "1", "torch": torch.__version__}
WITH_BF16 = Host(versions=TORCH, cpu_features=frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
AVX2_ONLY = Host(versions=TORCH, cpu_features=frozenset({"avx2", "fma"}))
H100 = Host(versions={**TORCH, "tensorrt": "11.4.0"}, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
HERE = detect_host()
MIN_ACCURACY = 0.999
W8A8_CONFIG = REPO_ROOT / "configs" / "all-minilm-l6-v2-w8a8.yaml"


def quiet() -> Progress:
    return Progress([], enabled=False)


def cosines(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(got.double(), want.double(), dim=-1)


# --- Int8Linear: its definition, by hand ------------------------------------------------------------
# The definition is computed here in float64; the layer computes in float32 (a few ulps of difference
# in x / s and in the scales). Inputs are drawn until no value lands within TIE of a rounding
# boundary, where those ulps could round it the other way: then both give the same integers.
TIE = 1e-3


def near_ties(t: torch.Tensor) -> torch.Tensor:
    """Where rounding `t` (float64) is within TIE of going the other way."""
    return ((t - t.floor()) - 0.5).abs() < TIE


@dataclass(frozen=True)
class ByHand:
    divisor: torch.Tensor  # float64 [in]: SmoothQuant's s
    weight: torch.Tensor  # int64 [out, in]: round(W * s / scale) per output channel
    scale: torch.Tensor  # float64 [out]
    ties: torch.Tensor  # bool [out, in]: weights within TIE of rounding the other way


def weights_by_hand(linear: torch.nn.Linear, amax: torch.Tensor) -> ByHand:
    w = linear.weight.detach().double()
    w_amax = w.abs().amax(dim=0).clamp(min=1e-5)
    divisor = (amax.double().clamp(min=1e-5) ** SMOOTHING_ALPHA / w_amax ** (1 - SMOOTHING_ALPHA)).clamp(min=1e-5)
    smoothed = w * divisor
    scale = smoothed.abs().amax(dim=1) / 127
    t = smoothed / scale[:, None]
    return ByHand(divisor, torch.round(t).clamp(-127, 127).long(), scale, near_ties(t))


def activations_by_hand(by_hand: ByHand, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """x / s quantized per row to 0..255 with a zero point, the range including 0: (q, z, a, clear
    of rounding ties)."""
    rows = x.reshape(-1, x.shape[-1]).double() / by_hand.divisor
    low = rows.min(dim=1, keepdim=True).values.clamp(max=0)
    high = rows.max(dim=1, keepdim=True).values.clamp(min=0)
    a = (high - low) / 255
    z_exact, t = -low / a, rows / a
    z = torch.round(z_exact)
    q = (torch.round(t) + z).clamp(0, 255).long()
    return q, z.long(), a, not (near_ties(z_exact).any() or near_ties(t).any())


def int8_by_hand(linear: torch.nn.Linear, by_hand: ByHand, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = a * scale * ((q - z) @ Wq) + bias, the integer product in int64; `weight`: the int8 weights
    [in, out] (the layer's, checked against `by_hand.weight` by the caller)."""
    q, z, a, _ = activations_by_hand(by_hand, x)
    product = (q - z) @ weight.long()  # int64: exact
    out = product.double() * a * by_hand.scale
    if linear.bias is not None:
        out = out + linear.bias.detach().double()
    return out.reshape(*x.shape[:-1], linear.out_features)


def clear_input(by_hand: ByHand, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The first of `draw()`'s inputs with no activation near a rounding tie."""
    for _ in range(200):
        x = draw()
        if activations_by_hand(by_hand, x)[3]:
            return x
    raise AssertionError("no input clear of rounding ties in 200 draws")


def check_weights(layer: Int8Linear, by_hand: ByHand) -> None:
    """The layer's int8 weights [in, out] are the definition's; a near tie may round either way."""
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (layer.in_features, layer.out_features)
    diff = layer.weight.t().long() - by_hand.weight
    assert diff.abs().max() <= 1 and not (diff != 0)[~by_hand.ties].any()
    assert torch.equal(layer.weight_colsum, layer.weight.to(torch.int32).sum(dim=0))  # the zero point's correction
    torch.testing.assert_close(layer.weight_scale.double(), by_hand.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("width", "out", "shape"), [(64, 48, (3, 7)), (63, 33, (1,)), (65, 17, (1, 1))])
def test_int8_linear_equals_its_definition(width: int, out: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, out)
    calibration = torch.randn(32, width)
    calibration[:, 5] *= 30  # an outlier channel: SmoothQuant moves it into the weights
    amax = calibration.abs().amax(dim=0)
    layer = Int8Linear.from_linear(linear, amax)
    by_hand = weights_by_hand(linear, amax)
    check_weights(layer, by_hand)

    def draw() -> torch.Tensor:
        x = torch.randn(*shape, width)
        x[..., 5] *= 30
        return x

    x = clear_input(by_hand, draw)
    got = layer(x)
    assert got.shape == (*shape, out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), int8_by_hand(linear, by_hand, layer.weight, x), rtol=1e-5, atol=1e-5)
    exact = linear(x).detach()
    assert cosines(got, exact).min() > 0.999
    assert (got - exact).abs().max() > 1e-4  # it did round


def test_int8_linear_keeps_all_positive_and_all_negative_rows_to_its_definition() -> None:
    """Rows all above 0 (after a GELU, say: zero point 0) and all below (zero point 255)."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 48)
    amax = torch.rand(64) * 3 + 0.5
    layer = Int8Linear.from_linear(linear, amax)
    by_hand = weights_by_hand(linear, amax)
    check_weights(layer, by_hand)
    x = clear_input(by_hand, lambda: torch.stack([torch.rand(64) * 3 + 0.1, -(torch.rand(64) * 3 + 0.1)]))
    _, zero, _, _ = activations_by_hand(by_hand, x)
    assert zero.flatten().tolist() == [0, 255]
    got = layer(x)
    torch.testing.assert_close(got.double(), int8_by_hand(linear, by_hand, layer.weight, x), rtol=1e-5, atol=1e-5)
    assert cosines(got, linear(x).detach()).min() > 0.999


@pytest.mark.parametrize("sign", [1, -1])
def test_the_zero_point_correction_is_exact(sign: int) -> None:
    """Rows of integers spanning 0..255 (all positive: zero point 0) or -255..0 (all negative: zero
    point 255) with s = 1 (calibrated on the weights' own max|W| per input channel, alpha 0.5) are their
    own quantization grid (scale 1): the output is the exact integer product times the weights'
    scales, bit for bit; a wrong zero-point correction would be off by a multiple of the column sums."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear, linear.weight.detach().abs().amax(dim=0), alpha=0.5)  # s = 1
    grid = torch.randint(0, 256, (6, 64))
    grid[:, 0], grid[:, 1] = 0, 255  # every row spans the whole range
    x = (sign * grid).float()
    product = (sign * grid) @ layer.weight.long()  # [rows, out], exact
    want = product.float() * layer.weight_scale + linear.bias.detach()
    assert torch.equal(layer(x), want)
    assert (layer.weight_colsum != 0).all()  # the correction had something to correct


def test_int8_linear_returns_fp32_whatever_its_input() -> None:
    """The activations between GEMMs stay fp32, also after a bf16 input (bei's CPU attention kernel
    hands the attention output projection bf16)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear, torch.full((64,), 3.0))
    x = torch.randn(2, 5, 64)
    got = layer(x.bfloat16())
    assert got.dtype == torch.float32 and got.shape == (2, 5, 48)
    assert cosines(got.float(), linear(x).detach()).min() > 0.99


def test_int8_linear_round_trips_through_its_state_dict() -> None:
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear, torch.rand(64) * 4)
    again = Int8Linear.empty_like(linear)
    x = torch.randn(9, 64)
    assert not torch.equal(again(x), layer(x))  # empty
    again.load_state_dict(layer.state_dict())  # strict: the same names and shapes
    assert torch.equal(again(x), layer(x))
    no_bias = torch.nn.Linear(64, 48, bias=False)
    assert Int8Linear.from_linear(no_bias, torch.ones(64)).bias is None and "bias" not in Int8Linear.empty_like(no_bias).state_dict()


def packed_rows(lengths: list[int]) -> Packed:
    mask = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return Packed.from_padded(np.arange(mask.size).reshape(mask.shape) % 50 + 5, mask)


def test_edges_are_each_rows_first_and_last_token() -> None:
    packed = packed_rows([3, 1, 4])  # tokens 0-2, 3, 4-7
    assert packed.edges.tolist() == [0, 3, 4, 2, 3, 7]
    slots = packed.edge_slots.tolist()
    assert [slots[t] for t in (0, 4, 2, 7)] == [0, 2, 3, 5] and slots[3] in (1, 4)  # a one-token row is both
    assert [slots[t] for t in (1, 5, 6)] == [-1, -1, -1]


def test_bf16_edges_compute_first_and_last_tokens_in_bf16_and_the_rest_in_int8() -> None:
    """With `bf16_edges`, a row at a sequence's edge is the bf16 GEMM of the original (unsmoothed)
    weights, as Bf16Linear computes it (within its output's bf16 rounding: the edges stay fp32);
    every other row is the int8 layer's."""
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 48)
    amax = torch.rand(64) * 4 + 0.5
    plain, edged = Int8Linear.from_linear(linear, amax), Int8Linear.from_linear(linear, amax, bf16_edges=True)
    assert plain.edge_weight is None and edged.edge_weight is not None and edged.edge_weight.dtype == torch.bfloat16
    packed = packed_rows([5, 1, 9, 2])
    x = torch.randn(packed.tokens, 64) * torch.linspace(0.2, 6, 64)
    got = project(edged, x, packed)
    edges = packed.edges.unique()
    middle = torch.tensor([t for t in range(packed.tokens) if t not in set(edges.tolist())])
    torch.testing.assert_close(got[edges], Bf16Linear.from_linear(linear)(x)[edges], rtol=2**-7, atol=1e-2)
    assert torch.equal(got[middle], plain(x)[middle])
    assert not torch.equal(got[edges], plain(x)[edges])  # the int8 rows would differ there
    assert torch.equal(project(plain, x, packed), plain(x))  # a layer without edge weights ignores them
    assert torch.equal(project(edged, x, None), plain(x))  # and so does a call without a packed batch
    again = Int8Linear.empty_like(linear, bf16_edges=True)
    again.load_state_dict(edged.state_dict())  # strict: edge_weight is stored
    assert torch.equal(project(again, x, packed), got)
    assert "edge_weight" not in plain.state_dict()  # an engine built without edges loads as before


def test_bf16_edges_under_torch_compile_equal_eager() -> None:
    """The engine runs compiled (inductor): the gather of the edge rows into the dequantizing pass
    must give what eager gives."""
    torch.manual_seed(6)
    linear = torch.nn.Linear(64, 96)
    layer = Int8Linear.from_linear(linear, torch.rand(64) * 3 + 0.5, bf16_edges=True)
    compiled = torch.compile(lambda x, packed: project(layer, x, packed), dynamic=True)
    for lengths in ([5, 1, 9, 2], [7, 3, 4, 4, 1, 12]):
        packed = packed_rows(lengths)
        x = torch.randn(packed.tokens, 64)
        torch.testing.assert_close(compiled(x, packed), project(layer, x, packed), rtol=1e-5, atol=1e-5)


# --- calibration: input_amax ---------------------------------------------------------------------
def test_input_amax_is_the_largest_input_per_channel_over_every_call() -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    calls = [torch.randn(3, 8), torch.randn(2, 5, 8) * 3, torch.randn(1, 8)]
    calls[2][0, 2] = -50  # the largest |x| of channel 2, negative, in the last call
    found = input_amax(model, ["0", "2"], lambda: [model(x) for x in calls])
    assert sorted(found) == ["0", "2"]
    want_first = torch.stack([x.reshape(-1, 8).abs().amax(dim=0) for x in calls]).amax(dim=0)
    assert torch.equal(found["0"], want_first) and found["0"][2] == 50
    with torch.no_grad():
        hidden = [torch.relu(model[0](x)).reshape(-1, 6) for x in calls]
    torch.testing.assert_close(found["2"], torch.stack([h.abs().amax(dim=0) for h in hidden]).amax(dim=0))
    # the hooks are gone: later calls change nothing and nothing records them
    assert all(not m._forward_pre_hooks for m in model.modules())
    before = {k: v.clone() for k, v in found.items()}
    model(torch.randn(4, 8) * 100)
    assert all(torch.equal(found[k], before[k]) for k in found)


def test_input_amax_removes_its_hooks_when_the_run_fails() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))

    def broken() -> None:
        model(torch.randn(2, 8))
        raise RuntimeError("calibration text failed")

    with pytest.raises(RuntimeError, match="calibration text failed"):
        input_amax(model, ["0"], broken)
    assert not model[0]._forward_pre_hooks


# --- kinds of layer ------------------------------------------------------------------------------
def test_group_of_names_a_layer_by_its_kind() -> None:
    assert group_of("body.layers.11.mlp.up") == "body.layers.*.mlp.up"
    assert group_of("body.layers.0.attn.qkv") == "body.layers.*.attn.qkv"
    assert group_of("encoder.h.3") == "encoder.h.*"  # an index at the end
    assert group_of("body.layer2.mlp.fc1") == "body.layer2.mlp.fc1"  # digits inside a name are not an index
    assert group_of("blocks.1.sub.22.proj") == "blocks.*.sub.*.proj"
    names = ["body.layers.0.attn.qkv", "body.layers.0.mlp.up", "body.layers.1.attn.qkv", "body.layers.10.mlp.up", "head.dense"]
    assert groups_of(names) == {
        "body.layers.*.attn.qkv": ["body.layers.0.attn.qkv", "body.layers.1.attn.qkv"],
        "body.layers.*.mlp.up": ["body.layers.0.mlp.up", "body.layers.10.mlp.up"],
        "head.dense": ["head.dense"],
    }
    assert list(groups_of(reversed(names))) == ["head.dense", "body.layers.*.mlp.up", "body.layers.*.attn.qkv"]  # first seen


# --- the search: choose_int8_kinds ---------------------------------------------------------------
def fake_measure(table: dict[frozenset[str], float]) -> tuple[Callable[[Sequence[str]], float], list[tuple[str, ...]]]:
    """`measure` reading the min cosine of each set of kinds from `table`; the calls it got."""
    calls: list[tuple[str, ...]] = []

    def measure(kinds: Sequence[str]) -> float:
        calls.append(tuple(kinds))
        return table[frozenset(kinds)]

    return measure, calls


def test_kinds_join_best_alone_first_while_the_target_holds() -> None:
    """Additive losses: up (alone 0.9999) then qkv (0.9997) join; out (0.9996) would take the set to
    0.9992, below the target; down alone (0.997) is below it and never tried with the others."""
    loss = {"qkv": 0.0003, "out": 0.0004, "up": 0.0001, "down": 0.003}
    table = {frozenset(s): 1 - sum(loss[k] for k in s) for s in [*[[k] for k in loss], ["up", "qkv"], ["up", "qkv", "out"]]}
    measure, calls = fake_measure(table)
    trials = choose_int8_kinds(list(loss), measure, 0.9995)
    alone = trials[:4]
    assert [t.kinds for t in alone] == [("qkv",), ("out",), ("up",), ("down",)] and not any(t.kept for t in alone)
    assert [t.min_cosine for t in alone] == [table[frozenset(t.kinds)] for t in alone]
    assert trials[4:] == [
        Trial(("up",), table[frozenset({"up"})], True),
        Trial(("up", "qkv"), table[frozenset({"up", "qkv"})], True),
        Trial(("up", "qkv", "out"), table[frozenset({"up", "qkv", "out"})], False),
    ]
    assert chosen_kinds(trials) == ("up", "qkv")
    # each kind alone once, then only the sets with more than one kind: the first is not measured again
    assert calls == [("qkv",), ("out",), ("up",), ("down",), ("up", "qkv"), ("up", "qkv", "out")]


def test_a_kind_that_breaks_the_target_is_left_out_and_later_ones_still_join() -> None:
    table = {
        frozenset({"a"}): 0.9999, frozenset({"b"}): 0.9998, frozenset({"c"}): 0.9997, frozenset({"d"}): 0.998,
        frozenset({"a", "b"}): 0.9990,  # a and b together break it (their errors add up where they meet)
        frozenset({"a", "c"}): 0.9995,  # exactly the target: kept
    }  # fmt: skip
    measure, _ = fake_measure(table)
    trials = choose_int8_kinds(["c", "d", "a", "b"], measure, 0.9995)
    assert [(t.kinds, t.kept) for t in trials[4:]] == [(("a",), True), (("a", "b"), False), (("a", "c"), True)]
    assert chosen_kinds(trials) == ("a", "c")


def test_no_kind_alone_reaching_the_target_chooses_none() -> None:
    measure, calls = fake_measure({frozenset({"a"}): 0.99, frozenset({"b"}): 0.98})
    trials = choose_int8_kinds(["a", "b"], measure, 0.999)
    assert trials == [Trial(("a",), 0.99, False), Trial(("b",), 0.98, False)]
    assert chosen_kinds(trials) == () and calls == [("a",), ("b",)]
    assert chosen_kinds([]) == ()


# --- plans ---------------------------------------------------------------------------------------
def test_the_torch_target_plans_int8_on_a_cpu_with_bf16_units(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("bert", "embed")
    config = parse_config(config_for("p", folder, "encoder_bert", quantization_type="int8", cpu_precision="bf16"))
    for target in ("torch", "auto"):  # auto: cpu_precision bf16 is the torch target's
        _, _, plan = plan_build(config, config_dir=tmp_path, target=target, host=WITH_BF16, progress=quiet(), dry_run=True)
        assert plan.target == "torch" and plan.precision == "int8" and plan.cpu_features == ["avx512_bf16"]
        assert plan.gpu is None and plan.profiles == [] and plan.weights_bytes == plan.parameters
        assert any("W8A8" in note for note in plan.notes), plan.notes
    amx = Host(versions=TORCH, cpu_features=frozenset({"avx512_bf16", "amx_bf16"}))
    _, _, plan = plan_build(config, config_dir=tmp_path, target="torch", host=amx, progress=quiet(), dry_run=True)
    assert plan.cpu_features == ["amx_bf16"]  # the best bf16 unit there is the one recorded
    with pytest.raises(ConfigError, match="cpu_precision: 'bf16' needs a CPU with bf16 units"):
        plan_build(config, config_dir=tmp_path, target="torch", host=AVX2_ONLY, progress=quiet(), dry_run=True)


def test_torch_int8_with_cpu_precision_fp32_names_cpu_precision_bf16(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("bert", "embed")
    config = parse_config(config_for("p", folder, "encoder_bert", quantization_type="int8"))  # cpu_precision fp32
    with pytest.raises(ConfigError, match=r"needs cpu_precision bf16 \(int8 with cpu_precision fp32 is the ONNX Runtime engine's"):
        plan_build(config, config_dir=tmp_path, target="torch", host=WITH_BF16, progress=quiet(), dry_run=True)
    # the ONNX Runtime engine still builds int8 with fp32, with or without bf16 units
    for host in (WITH_BF16, AVX2_ONLY):
        _, _, plan = plan_build(config, config_dir=tmp_path, target="onnxruntime", host=host, progress=quiet(), dry_run=True)
        assert plan.target == "onnxruntime-cpu" and plan.precision == "int8" and plan.cpu_features == []


@pytest.mark.parametrize("target", ["torch", "tensorrt"])
def test_gpu_targets_plan_their_gpu_precision_for_int8_with_a_note(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, target: str
) -> None:
    folder = tiny_checkpoint_factory("bert", "embed")
    config = parse_config(config_for("p", folder, "encoder_bert", quantization_type="int8"))
    progress = quiet()
    _, _, plan = plan_build(config, config_dir=tmp_path, target=target, host=H100, progress=progress, dry_run=True)
    assert plan.target == target and plan.precision == "fp16" and plan.gpu == H100.gpu
    assert plan.quantized_layers == [] and plan.cpu_features == []
    assert cpu_only_int8(plan.precision) in plan.notes and "the GPU engine is fp16" in cpu_only_int8(plan.precision)
    assert bool(plan.profiles) == (target == "tensorrt")
    plain = parse_config(config_for("p", folder, "encoder_bert"))
    _, _, fp16 = plan_build(plain, config_dir=tmp_path, target=target, host=H100, progress=quiet(), dry_run=True)
    assert fp16.precision == plan.precision and fp16.notes == [n for n in plan.notes if n != cpu_only_int8(plan.precision)]


@pytest.mark.parametrize("field", ["quantization_type", "cpu_quantization"])
def test_cpu_candidates_add_torch_w8a8_only_with_bf16_units(field: str) -> None:
    base: dict[str, Any] = {"model_name": "m", "trt_llm": {"build": {"checkpoint_repository": {"source": "LOCAL", "repo": "x"}}}}
    assert [c.name for c in cpu_candidates(parse_config(base), WITH_BF16)] == ["fp32", "bf16"]
    base["trt_llm"]["build"][field] = "int8"
    config = parse_config(base)
    with_bf16 = cpu_candidates(config, WITH_BF16)
    assert [c.name for c in with_bf16] == ["fp32", "bf16", "int8", "int8+bf16"]
    assert [(c.cpu_precision, c.quantization) for c in with_bf16][2:] == [("fp32", "int8"), ("bf16", "int8")]
    assert [c.name for c in cpu_candidates(config, AVX2_ONLY)] == ["fp32", "int8"]


# --- a real build: all-MiniLM-L6-v2 --------------------------------------------------------------
@dataclass(frozen=True)
class Int8Build:
    engine_dir: Path | None  # None where the build was refused
    error: ConfigError | None
    log: str


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory: pytest.TempPathFactory) -> Int8Build:
    """One real build of configs/all-minilm-l6-v2-w8a8.yaml (`quantization_type: int8`, `cpu_precision:
    bf16`, `min_accuracy: 0.999`) by the torch target, on this machine (about a minute)."""
    root = tmp_path_factory.mktemp("minilm-int8")
    config = load_config(W8A8_CONFIG)
    assert config.trt_llm.build.quantization_config.min_accuracy == MIN_ACCURACY
    log = io.StringIO()
    try:
        result = build_engine(config, config_dir=root, engines_root=root / "engines", target="torch", progress=Progress([], stream=log))
    except ConfigError as err:
        return Int8Build(None, err, log.getvalue())
    return Int8Build(result.engine_dir, None, log.getvalue())


def built(build: Int8Build) -> tuple[Path, Manifest]:
    if build.engine_dir is None:
        pytest.skip("this CPU has no bf16 units: the build is refused (test_int8_build_on_this_machine)")
    return build.engine_dir, read_manifest(build.engine_dir)


def test_int8_build_on_this_machine(minilm_int8: Int8Build) -> None:
    """Where this CPU has bf16 units: W8A8 on the kinds of layer that kept the search's target on
    held-out texts, bf16 for the rest, the final gate min_accuracy, the trials recorded; elsewhere the
    build says it needs cpu_precision bf16's units."""
    from safetensors import safe_open

    from bei.targets.loading import load_engine
    from bei.targets.torch.backend import TorchBackend

    if not HERE.bf16_units:
        assert minilm_int8.error is not None and minilm_int8.engine_dir is None
        assert "cpu_precision: 'bf16' needs a CPU with bf16 units" in minilm_int8.error.message
        return
    assert minilm_int8.error is None, minilm_int8.log
    engine_dir, manifest = built(minilm_int8)
    assert manifest.precision == "int8" and manifest.target.name == "torch" and manifest.target.device == "cpu"
    assert manifest.target.cpu_features == HERE.bf16_units[:1]
    quantization = manifest.quantization or {}
    layers, bf16 = quantization["layers"], quantization["bf16_layers"]
    assert quantization["type"] == "int8" and quantization["smoothing_alpha"] == SMOOTHING_ALPHA
    assert quantization["bf16_edges"] is True  # each sequence's first and last token in bf16
    assert layers and not set(layers) & set(bf16) and len(layers) + len(bf16) == 24  # 6 layers x qkv, out, up, down
    accuracy = quantization["accuracy"]
    assert accuracy["min_cosine"] >= MIN_ACCURACY and accuracy["samples"] >= 32
    search = quantization["search"]
    target = 1 - (1 - MIN_ACCURACY) / 2
    assert search["target"] == pytest.approx(target)
    trials = search["trials"]
    kinds = ["body.layers.*.attn.out", "body.layers.*.attn.qkv", "body.layers.*.mlp.down", "body.layers.*.mlp.up"]
    assert sorted(t["int8"][0] for t in trials[:4]) == kinds and all(len(t["int8"]) == 1 and not t["kept"] for t in trials[:4])
    kept = [t for t in trials if t["kept"]]
    assert kept and all(t["min_cosine"] >= target for t in kept)
    assert all(t["min_cosine"] < target for t in trials[4:] if not t["kept"])
    assert sorted(groups_of(layers)) == sorted(kept[-1]["int8"])  # the last kept set is the engine's
    assert f"{len(layers)} of 24 Linear layers W8A8" in minilm_int8.log
    # the weights as stored: int8 for the W8A8 layers, bf16 for the others
    with safe_open(str(engine_dir / "weights.safetensors"), "pt") as weights:
        assert {weights.get_slice(f"{n}.weight").get_dtype() for n in layers} == {"I8"}
        assert {weights.get_slice(f"{n}.weight").get_dtype() for n in bf16} <= {"BF16"}
    # `bei serve`'s load: the same layers, compiled (inductor, from the build's cache)
    engine = load_engine(engine_dir)
    backend = engine.backend
    assert isinstance(backend, TorchBackend) and backend.compiled
    assert all(isinstance(backend.module.get_submodule(n), Int8Linear) for n in layers)
    assert all(backend.module.get_submodule(n).edge_weight is not None for n in layers)
    assert all(isinstance(backend.module.get_submodule(n), Bf16Linear) for n in bf16)
    print(f"int8 search: {trials}; accuracy {accuracy['min_cosine']:.6f} (mean {accuracy['mean_cosine']:.6f})")


TEXTS = [  # sentences, as the build's held-out texts (4 to 30 words) and beyond them
    "Engines are compiled once and served many times.",
    "A café in Zürich serves coffee at 7 a.m.",
    "Why do rivers flow toward the sea?",
    "def add(a, b):\n    return a + b",
    "東京は日本の首都です。",
    "The quarterly report shows revenue grew 12% year over year, driven by cloud services.",
    "Summarize the report in which the goalkeeper lost a penalty in the last minute.",
    "embeddings " * 60,
]
SHORT = ["no", "yes", "ok", "no no", "?", "I like it.", "Hello world."]  # queries of one to three words


@dataclass(frozen=True)
class Served:
    texts: np.ndarray  # row cosines to sentence-transformers fp32, one per TEXTS
    short: np.ndarray  # the same for SHORT
    alone: float  # TEXTS[3] sent alone against in the batch


@pytest.fixture(scope="module")
def served(minilm_int8: Int8Build, st_model: Any) -> Served:
    """The int8 engine served over HTTP (the real app, 127.0.0.1), its vectors compared with
    sentence-transformers fp32 on the same weights."""
    engine_dir, _ = built(minilm_int8)
    with serve_engine(engine_dir) as base_url:
        response = httpx.post(f"{base_url}/v1/embeddings", json={"input": TEXTS + SHORT}, timeout=120)
        single = httpx.post(f"{base_url}/v1/embeddings", json={"input": TEXTS[3]}, timeout=60)  # a one-row batch
    assert response.status_code == 200, response.text
    assert single.status_code == 200, single.text
    got = np.array([row["embedding"] for row in response.json()["data"]])
    want = st_model.encode(TEXTS + SHORT, normalize_embeddings=True)
    found = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    alone = np.array(single.json()["data"][0]["embedding"])
    print(f"int8 engine against sentence-transformers fp32: {dict(zip(TEXTS + SHORT, np.round(found, 6).tolist(), strict=True))}")
    return Served(found[: len(TEXTS)], found[len(TEXTS) :], float(alone @ got[3] / np.linalg.norm(alone) / np.linalg.norm(got[3])))


def test_int8_engine_serves_close_to_sentence_transformers(served: Served) -> None:
    assert served.texts.min() >= MIN_ACCURACY, served.texts
    assert served.texts.min() < 1 - 1e-6  # quantized: not the fp32 vectors
    assert served.alone >= 0.9999  # per-token scales: a row's vector hardly depends on its batch


def test_short_queries_stay_close(served: Served) -> None:
    """Queries of one to three words are mostly [CLS] and [SEP], whose activations per-token int8
    rounds worst: with every row int8, 'no no' came out at 0.99895 and with q/k/v also int8 at 0.998.
    The engine computes each sequence's first and last token in bf16 (`bf16_edges`): 0.9994 and up."""
    assert served.short.min() >= MIN_ACCURACY, served.short


def test_int8_engine_is_refused_on_a_cpu_without_bf16_units(minilm_int8: Int8Build) -> None:
    _, manifest = built(minilm_int8)
    check_compatible(manifest, HERE)
    with pytest.raises(EngineError, match=rf"\(int8 on the CPU\) needs a CPU with {HERE.bf16_units[0]}.*bei build <config.yaml>"):
        check_compatible(manifest, AVX2_ONLY)
