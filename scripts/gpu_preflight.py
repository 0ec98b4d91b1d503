#!/usr/bin/env python
"""The preflight of `scripts/gpu-check`: what must hold on the GPU machine before its figures mean anything.

    python scripts/gpu_preflight.py --out preflight.json          # on the GPU machine
    python scripts/gpu_preflight.py --device cpu --tiny           # the same checks at tiny shapes (CPU rehearsal)

Checks, each one a line on stdout and an entry of the JSON (a failing check does not stop the others):
- versions: python, torch (+CUDA), transformers, sentence-transformers, the GPU and its capability;
- bei's serving imports (starlette, uvicorn, pydantic: carried as wheels there) and `python -m bei --help`;
- flash `varlen_attn` taken, not the masked fall-back, for an encoder (BERT, fp16) and a GQA decoder
  (Mistral shapes, bf16), eager, and the packed output equal to transformers' (cosine);
- FP8 row-wise: `Fp8Linear` (`torch._scaled_mm`, row-wise activation scales, per-channel weight
  scales) against the product of its dequantized operands and against the bf16 Linear;
- a packed BERT-base forward (fp16, mixed lengths) against transformers' padded one.

Exit status 0 when every check passed. On the CPU the flash checks expect the masked path.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_gpu
import numpy as np
from bench_gpu import BERT_BASE, MISTRAL_7B, TINY_BERTS, TINY_MISTRAL, Inputs, hf_feeds, hf_model, hf_pooled, min_cosine, packed_feeds

COSINE_MIN = 0.999  # fp16 / bf16 packed against transformers on the same weights


class Checks:
    def __init__(self, out: Path | None) -> None:
        self.out, self.results = out, {}  # type: ignore[var-annotated]

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            result = {"ok": True, **check()}
        except Exception as err:  # noqa: BLE001 - one failing check is reported, the others run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - started, 2)
        self.results[name] = result
        shown = {k: v for k, v in result.items() if k != "traceback"}
        print(f"[preflight] {'ok  ' if result['ok'] else 'FAIL'} {name}: {json.dumps(shown, default=str)}", flush=True)
        if self.out:
            self.out.write_text(json.dumps(self.results, indent=2, default=str))


def versions(device: str) -> dict[str, Any]:
    import sentence_transformers
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__,
    }  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return info


def serving_imports() -> dict[str, Any]:
    import pydantic
    import starlette
    import uvicorn

    import bei.api.app
    import bei.serve  # noqa: F401

    run = subprocess.run([sys.executable, "-m", "bei", "--help"], capture_output=True, text=True, timeout=60, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"python -m bei --help exited {run.returncode}: {run.stderr[-500:]}")
    return {"pydantic": pydantic.VERSION, "starlette": starlette.__version__, "uvicorn": uvicorn.__version__}


def attention_paths(config: dict[str, Any], dtype: Any, device: str, lengths: list[int]) -> dict[str, Any]:
    """bei's packed module (transformers' weights) eager on mixed lengths: which attention ran, and the cosine."""
    import torch

    from bei.modeling.packed import attention

    calls = {"flash": 0, "masked": 0}
    masked, flash_module = attention._masked_attention, None

    def count_masked(*args: Any, **kwargs: Any) -> Any:
        calls["masked"] += 1
        return masked(*args, **kwargs)

    attention._masked_attention = count_masked  # type: ignore[assignment]
    try:
        from torch.nn.attention import varlen as flash_module

        flash = flash_module.varlen_attn

        @functools.wraps(flash)  # bei reads varlen_attn's signature (its keywords differ between torch versions)
        def count_flash(*args: Any, **kwargs: Any) -> Any:
            calls["flash"] += 1
            return flash(*args, **kwargs)

        flash_module.varlen_attn = count_flash  # type: ignore[assignment]
    except ImportError:
        flash = None
    try:
        with torch.inference_mode():
            hf = hf_model(config, device, dtype)
            module = bench_gpu.bei_module(config, hf, device, dtype)
            inputs = Inputs.random(np.array(lengths), config["vocab_size"], 0)
            everything = [list(range(len(lengths)))]
            mode = "last" if config["model_type"] == "mistral" else "mean"
            reference = hf_pooled(hf, mode, hf_feeds(inputs, everything, device)[0])
            got = module(packed_feeds(inputs, everything, device, types=mode == "mean")[0])
            cosine = min_cosine(got, reference)
    finally:
        attention._masked_attention = masked  # type: ignore[assignment]
        if flash_module is not None and flash is not None:
            flash_module.varlen_attn = flash  # type: ignore[assignment]
    expected = "flash" if device == "cuda" else "masked"
    if calls[expected] == 0 or calls["flash" if expected == "masked" else "masked"] != 0:
        raise RuntimeError(f"attention calls {calls}: expected {expected} only")
    if not cosine >= COSINE_MIN:
        raise RuntimeError(f"packed vs transformers min cosine {cosine:.5f} < {COSINE_MIN}")
    return {"calls": calls, "cosine": round(cosine, 6), "dtype": str(dtype)}


def fp8_rowwise(device: str, tiny: bool) -> dict[str, Any]:
    import torch

    from bei.modeling.packed.fp8 import Fp8Linear, quantize_rows

    k, n, rows = (64, 48, 20) if tiny else (4096, 14336, 512)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
    fp8 = Fp8Linear.from_linear(linear)
    x = torch.randn(rows, k, device=device, dtype=dtype) * torch.linspace(0.1, 10, rows, device=device, dtype=dtype)[:, None]
    with torch.inference_mode():
        got = fp8(x).float()
        q, scale = quantize_rows(x)
        dequantized = (q.float() * scale) @ (fp8.weight.float() * fp8.weight_scale[:, None]).t() + fp8.bias.float()  # type: ignore[union-attr]
        exact = float((got - dequantized).abs().max() / dequantized.abs().max())
        cosine = min_cosine(got, linear(x))
    if exact > 1e-2:  # bf16 output rounding is ~4e-3 of the largest value
        raise RuntimeError(f"FP8 product off its dequantized operands by {exact:.2e} (relative to max)")
    if cosine < 0.99:
        raise RuntimeError(f"FP8 Linear vs {dtype} Linear min cosine {cosine:.5f} < 0.99")
    return {"shape": [rows, k, n], "rel_err_vs_dequantized": exact, "cosine_vs_linear": round(cosine, 6),
            "scales_after": fp8.cpu_scales_after}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checks = Checks(args.out)
    checks.run("versions", lambda: versions(device))
    checks.run("serving imports", serving_imports)
    half = torch.float16 if device == "cuda" else torch.float32
    bf16 = torch.bfloat16 if device == "cuda" else torch.float32
    bert = TINY_BERTS["bert-base"] if args.tiny else BERT_BASE
    mistral = TINY_MISTRAL if args.tiny else {**MISTRAL_7B, "num_hidden_layers": 2}
    checks.run("attention: encoder (BERT) flash varlen", lambda: attention_paths(bert, half, device, [7, 30, 64, 5]))
    checks.run("attention: GQA decoder (Mistral) flash varlen", lambda: attention_paths(mistral, bf16, device, [9, 40, 64, 3]))
    checks.run("fp8 row-wise Fp8Linear", lambda: fp8_rowwise(device, args.tiny))
    lengths = np.random.default_rng(1).integers(16, 96 if args.tiny else 512, 16 if args.tiny else 64).tolist()
    checks.run("packed BERT-base forward = transformers", lambda: attention_paths(bert, half, device, lengths))
    failed = [name for name, r in checks.results.items() if not r["ok"]]
    print(f"[preflight] {len(checks.results) - len(failed)}/{len(checks.results)} passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
