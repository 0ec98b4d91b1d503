"""What a module's Linear layers see on calibration texts: the per-channel range of their inputs,
for static FP8 scales and SmoothQuant's int8 migration."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def input_amax(module: torch.nn.Module, layers: Iterable[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The largest |input| of each input channel of `layers` over `run()` (the calibration texts)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_layer: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).cpu()
            found[name] = torch.maximum(found[name], amax) if name in found else amax

        return record

    handles = [module.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found
