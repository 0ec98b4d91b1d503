"""W8A8 Linear layers for CPU engines: int8 weights (one scale per output channel) times int8
activations (one scale and zero point per token, computed at run time), multiplied by
`torch._int_mm` (oneDNN's VNNI kernel: on AVX512-VNNI about twice the bf16 GEMM rate) with int32
accumulation, after SmoothQuant's migration of the activations' outlier channels into the weights.

    x' = x / s,  W' = W * s          s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), per input channel
    x' ~ (q - z) * a                 q in 0..255 per token: a = (max - min) / 255, z = round(-min / a)
    y  = a * w * (q W'q - z colsum(W'q)) + bias

`q` is stored as q - 128 (int8) and the zero point as z - 128, so the product is the s8 x s8 GEMM
torch has; the zero point's correction is exact (int32). `max|x_j|` comes from calibration texts
(bei/modeling/packed/observe.py). Which layers take int8 is the build's choice (`choose_int8_kinds`): the others stay
bf16 (bei/modeling/packed/bf16.py), LayerNorm, softmax, attention and pooling fp32.

Each sequence's first and last token ([CLS] and [SEP] in BERT: `Packed.edges`) can keep bf16 GEMMs
in an int8 layer (`edge_weight`, the unsmoothed weights; `project` passes the rows): those tokens'
activations have the widest outlier channels, which per-token int8 rounds worst, and a query of a
word or two is mostly them (all-MiniLM-L6-v2 with q/k/v, attention out and MLP up in int8: min
cosine on one-to-three-word queries 0.9989 with every row int8, 0.9994 with the edges in bf16).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bei.modeling.packed.layout import Packed
from bei.modeling.packed.replace import replace_linears

SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: 0.5 was the most accurate of 0, 0.5, 0.75 (docs/benchmarks.md)


class Int8Linear(torch.nn.Module):
    weight: torch.Tensor  # int8 [in, out]: `torch._int_mm`'s right operand
    weight_scale: torch.Tensor  # fp32 [out]
    weight_colsum: torch.Tensor  # int32 [out]: the zero point's correction
    input_multiplier: torch.Tensor  # fp32 [in]: 1 / SmoothQuant's s (x * (1 / s) before quantizing)
    edge_weight: torch.Tensor | None  # bf16 [out, in]: the original weights, for the rows kept in bf16

    def __init__(self, in_features: int, out_features: int, bias: bool, bf16_edges: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("weight_colsum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("input_multiplier", torch.ones(in_features, dtype=torch.float32))
        edge_weight = torch.zeros(out_features, in_features, dtype=torch.bfloat16) if bf16_edges else None
        self.register_buffer("edge_weight", edge_weight)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def empty_like(cls, linear: torch.nn.Linear, bf16_edges: bool = False) -> Int8Linear:
        """The layer's shape, to load a built engine's weights into."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, bf16_edges).to(linear.weight.device)

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, input_amax: torch.Tensor, alpha: float = SMOOTHING_ALPHA, bf16_edges: bool = False
    ) -> Int8Linear:
        """Quantize `linear`, whose inputs reached `input_amax` [in] per channel on calibration texts."""
        layer = cls.empty_like(linear, bf16_edges)
        if layer.edge_weight is not None:
            layer.edge_weight.copy_(linear.weight.detach().to(torch.bfloat16))
        w = linear.weight.detach().float().cpu()
        w_amax = w.abs().amax(dim=0).clamp(min=1e-5)
        divisor = (input_amax.float().cpu().clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-5)
        w = w * divisor[None, :]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.weight.copy_(q.t())
        layer.weight_scale.copy_(scale)
        layer.weight_colsum.copy_(q.to(torch.int32).sum(dim=1))
        layer.input_multiplier.copy_(1 / divisor)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x: torch.Tensor, edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`edges`: the rows of x computed in bf16 instead, when the layer keeps `edge_weight`, and each
        row's index among them or -1 (`Packed.edges`, `Packed.edge_slots`)."""
        shape = x.shape
        # multiplications, not divisions, per element (a vector division costs ~20 times more)
        flat = x.reshape(-1, self.in_features)
        rows = flat.float() * self.input_multiplier
        low = rows.amin(dim=-1, keepdim=True).clamp(max=0)
        high = rows.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / 255).clamp(min=1e-12)
        inverse = 1 / scale
        zero = torch.round(-low * inverse)  # 0..255
        q = (torch.round(rows * inverse) + zero).clamp(0, 255).sub(128).to(torch.int8)
        acc = torch._int_mm(q, self.weight) - (zero.to(torch.int32) - 128) * self.weight_colsum
        out = acc.float() * (scale * self.weight_scale)
        if edges is not None and self.edge_weight is not None:
            rows_bf16, slots = edges
            exact = F.linear(flat.index_select(0, rows_bf16).to(torch.bfloat16), self.edge_weight).float()
            # a gather into the dequantizing pass (a scatter there cost inductor's code 20% of the engine's time)
            out = torch.where(slots[:, None] >= 0, exact[slots.clamp(min=0)], out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)  # fp32 between GEMMs, whatever x is


def project(layer: torch.nn.Module, x: torch.Tensor, packed: Packed | None) -> torch.Tensor:
    """`layer(x)` for a Linear layer of any kind; an Int8Linear that keeps bf16 weights for the
    sequences' first and last tokens also gets their rows (`packed.edges`)."""
    if packed is not None and isinstance(layer, Int8Linear) and layer.edge_weight is not None:
        return layer(x, (packed.edges, packed.edge_slots))
    return layer(x)


def quantize_int8(
    module: torch.nn.Module, layers: Iterable[str], input_amax: Mapping[str, torch.Tensor], bf16_edges: bool = False
) -> list[str]:
    """Replace `layers` by Int8Linear (smoothed with `input_amax[name]`), in place; returns their names."""
    names = list(layers)
    for name in names:
        amax = input_amax[name]
        replace_linears(module, [name], lambda linear: Int8Linear.from_linear(linear, amax, bf16_edges=bf16_edges))  # noqa: B023 (called here)
    return names


def int8_structure(module: torch.nn.Module, layers: Iterable[str], bf16_edges: bool = False) -> list[str]:
    """Empty Int8Linear layers in place of `layers`: a built engine's weights load into them."""
    return replace_linears(module, layers, lambda linear: Int8Linear.empty_like(linear, bf16_edges))


def group_of(name: str) -> str:
    """A layer's kind across the stack: its name with the layer index as `*` (body.layers.*.mlp.up)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def groups_of(names: Iterable[str]) -> dict[str, list[str]]:
    """Layer names by kind (`group_of`), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    return groups


@dataclass(frozen=True)
class Trial:
    kinds: tuple[str, ...]  # the kinds of layer in int8 (the rest bf16)
    min_cosine: float
    kept: bool


def choose_int8_kinds(kinds: Sequence[str], measure: Callable[[Sequence[str]], float], target: float) -> list[Trial]:
    """Which kinds of layer (`group_of`: q/k/v, attention out, MLP up, MLP down) take int8, keeping
    the sensitive ones in bf16: each kind alone is measured (`measure(kinds)`: the min cosine to the
    unquantized module with those kinds in int8), then kinds join in order of their alone figure,
    best first, each kept only while the set stays at or above `target`. Returns every trial; the
    last kept one (if any) is the choice. Whole kinds, not single layers: choosing layer by layer
    fitted the held-out texts (on all-MiniLM-L6-v2 it kept 20 of 24 layers at 0.9995 there and
    0.9990 on the benchmark's texts, where kinds keep 18 at 0.9996 and 0.9991)."""
    alone = {kind: measure([kind]) for kind in kinds}
    trials = [Trial((kind,), alone[kind], False) for kind in kinds]
    chosen: list[str] = []
    for kind in sorted(kinds, key=lambda k: -alone[k]):
        if alone[kind] < target:
            continue
        together = [*chosen, kind]
        value = alone[kind] if not chosen else measure(together)
        kept = value >= target
        trials.append(Trial(tuple(together), value, kept))
        if kept:
            chosen = together
    return trials


def chosen_kinds(trials: Sequence[Trial]) -> tuple[str, ...]:
    """The kinds of the last kept trial (none when no kind alone reached the target)."""
    kept = [t for t in trials if t.kept]
    return kept[-1].kinds if kept else ()
