"""FP8 Linear layers for the torch target: E4M3 weights with per-output-channel scales, activations
quantized per row (dynamic) or with one calibrated scale (static), multiplied by `torch._scaled_mm`.

On Hopper `_scaled_mm` is the FP8 tensor-core GEMM; under torch.compile the activation's
amax / divide / cast fuse into the op that produces it, which is what makes FP8 faster than BF16
(unfused, the extra pass over the activations costs more than the GEMM saves). On the CPU the same
op runs (slowly), which is how the accuracy gate measures the very arithmetic the GPU will do. Some
torch builds' CPU kernel takes only per-tensor scales (2.11: "only supports per-tensor scaling for
CPU backend"); there the E4M3 product runs with unit scales and the row and channel scales multiply
its fp32 result, the same arithmetic (the kernel also scales after accumulating).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from bei.modeling.packed.observe import input_amax
from bei.modeling.packed.replace import replace_linears
from bei.modeling.quant_layers import quantized_layer_names

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# _scaled_mm needs both GEMM dimensions to be multiples of 16
ALIGN = 16


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise ([M, 1] x [1, N]) scales."""
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def _scales(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp(amax.float(), min=1e-12) / E4M3_MAX


def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, k] -> E4M3 [rows, k] and the fp32 scale of each row [rows, 1] (`scale`: one static scale)."""
    if scale is None:
        scale = _scales(x.abs().amax(dim=-1, keepdim=True))
    else:
        scale = scale.float().expand(x.shape[0], 1)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.contiguous()


class Fp8Linear(torch.nn.Module):
    weight: torch.Tensor  # E4M3 [out, in]
    weight_scale: torch.Tensor  # [out]
    input_scale: torch.Tensor  # scalar; 0: dynamic per row

    def __init__(self, in_features: int, out_features: int, bias: bool, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32))  # 0: dynamic per row
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=out_dtype), requires_grad=False) if bias else None
        self.static = False  # input_scale > 0, as a Python flag: the forward never syncs on the buffer
        self.cpu_scales_after = not cpu_rowwise_scaled_mm()  # a Python flag too: no probe under torch.compile

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Fp8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        w = linear.weight.detach().float()
        q, scale = quantize_rows(w)  # one scale per output channel
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale.view(-1))
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach())
        return layer.to(linear.weight.device)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.static = bool(self.input_scale.item() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        q, scale = quantize_rows(rows, self.input_scale if self.static else None)
        out_dtype = self.bias.dtype if self.bias is not None else x.dtype
        if self.cpu_scales_after and not x.is_cuda:
            one = torch.ones((), dtype=torch.float32)
            out = torch._scaled_mm(q, self.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            out = (out * scale * self.weight_scale.view(1, -1)).to(out_dtype)
        else:
            out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.view(1, -1), out_dtype=out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


def fp8_layers(module: torch.nn.Module) -> list[str]:
    """The Linear layers of `module` that FP8 quantizes: the shared rule, and widths `_scaled_mm` takes."""
    linears = {
        name: m.in_features
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % ALIGN == 0 and m.out_features % ALIGN == 0
    }
    return quantized_layer_names(linears, "fp8")


def quantize_fp8(module: torch.nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Replace `layers` (default `fp8_layers(module)`) by Fp8Linear, in place; returns their names."""
    return replace_linears(module, layers if layers is not None else fp8_layers(module), Fp8Linear.from_linear)


def calibrate_static_scales(module: torch.nn.Module, run_calibration: Callable[[], object]) -> int:
    """Static activation scales: the largest |input| each Fp8Linear saw over `run_calibration()` / 448.

    Layers are switched to dynamic scaling while calibrating; returns how many layers were calibrated."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, Fp8Linear)}
    for m in layers.values():
        m.input_scale.zero_()
        m.static = False
    amax = input_amax(module, layers, run_calibration)
    for name, m in layers.items():
        m.input_scale.copy_(_scales(amax[name].max()))
        m.static = True
    return len(layers)
