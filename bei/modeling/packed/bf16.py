"""bf16 Linear layers for CPU engines: the weights stored in bf16 and every GEMM run in bf16 with
fp32 accumulation (oneDNN, on CPUs with AVX512-BF16 or AMX-BF16 units), while the activations
between GEMMs, LayerNorm, softmax, attention, pooling and the task heads stay fp32. Rounding only
the GEMM inputs keeps an embedder within cosine 0.9999 of its fp32 outputs, where casting the whole
model to bf16 (as `torch_dtype=torch.bfloat16` does) loses an order of magnitude more.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from bei.modeling.packed.replace import replace_linears
from bei.modeling.quant_layers import quantized_layer_names


class Bf16Linear(torch.nn.Module):
    weight: torch.Tensor  # bf16 [out, in]

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Bf16Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight.copy_(linear.weight.detach().to(torch.bfloat16))
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight).float()  # fp32 between GEMMs, whatever x is
        return out + self.bias if self.bias is not None else out


def bf16_layers(module: torch.nn.Module) -> list[str]:
    """The Linear layers that run in bf16: the transformer's (the task heads stay fp32), by the rule
    quantization uses."""
    linears = {name: m.in_features for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return quantized_layer_names(linears, "fp8")


def to_bf16(module: torch.nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Replace `layers` (default `bf16_layers(module)`) by Bf16Linear, in place; returns their names."""
    return replace_linears(module, layers if layers is not None else bf16_layers(module), Bf16Linear.from_linear)
