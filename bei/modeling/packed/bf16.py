"""bf16 Linear layers for CPU engines: the weights stored in bf16 and every GEMM run in bf16 with
fp32 accumulation (oneDNN, on CPUs with AVX512-BF16 or AMX-BF16 units); each GEMM's output (bias
and fused activation included) is rounded to bf16 once and handed on in fp32, like the residual
sums, LayerNorm, softmax, pooling and the task heads. Rounding only the GEMMs' inputs and outputs
keeps an embedder within cosine 0.9999 of its fp32 outputs, where casting the whole model to bf16
(as `torch_dtype=torch.bfloat16` does) loses an order of magnitude more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from bei.modeling.packed import onednn
from bei.modeling.packed.replace import replace_linears
from bei.modeling.quant_layers import quantized_layer_names


class Bf16Linear(torch.nn.Module):
    """y = act(x @ W^T + b) on bf16 inputs with fp32 accumulation, rounded to bf16 once: on oneDNN with
    the weight packed and the bias and `activation` in the GEMM's epilogue (bei/modeling/packed/onednn.py)
    where torch has it, else `F.linear` and the same steps in fp32. An MLP hands its activation to the
    layer with `fuse` (`fuse_mlp_activations`)."""

    weight: torch.Tensor  # bf16 [out, in]

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.activation = "none"  # a key of onednn.POST_OPS (`fuse`)
        self.activate: Callable[[torch.Tensor], torch.Tensor] | None = None  # the same, for the F.linear path
        self.key = onednn.new_key()  # its packed weight's (onednn.py)
        self.onednn = onednn.available()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Bf16Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight.copy_(linear.weight.detach().to(torch.bfloat16))
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def fuse(self, function: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        """Apply `function` to the output before rounding it; `name`: oneDNN's for it (onednn.POST_OPS)."""
        self.activate, self.activation = function, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 out, whatever x is: the modules around stay fp32. Under torch.compile a bf16 consumer's
        # cast back is no pass at all (inductor drops a bf16 -> fp32 -> bf16 chain of casts).
        flat = x.to(torch.bfloat16)
        if flat.dim() != 2:
            flat = flat.reshape(-1, self.in_features)
        if self.onednn and flat.device.type == "cpu":
            bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
            out = onednn.onednn_linear(flat, self.weight, bias, self.key, self.activation).float()
        else:
            out = F.linear(flat, self.weight).float()
            if self.bias is not None:
                out = out + self.bias
            if self.activate is not None:
                out = self.activate(out)
            out = out.to(torch.bfloat16).float()
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)


def bf16_layers(module: torch.nn.Module) -> list[str]:
    """The Linear layers that run in bf16: the transformer's (the task heads stay fp32), by the rule
    quantization uses."""
    linears = {name: m.in_features for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return quantized_layer_names(linears, "fp8")


def to_bf16(module: torch.nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Replace `layers` (default `bf16_layers(module)`) by Bf16Linear, in place; returns their names."""
    return replace_linears(module, layers if layers is not None else bf16_layers(module), Bf16Linear.from_linear)
