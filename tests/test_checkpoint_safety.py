"""Reading a checkpoint is safe: modules.json paths stay inside the checkpoint folder, Dense weights in
pytorch_model.bin load with `weights_only=True` (no pickled code runs), and an engine failure reaches
clients without server paths."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bei.errors import ModelError, client_safe


def test_module_paths_stay_inside_the_checkpoint(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    from bei.modeling.detect import module_dir, read_model_spec

    folder = Path(shutil.copytree(tiny_checkpoint_factory("bert", "embed", pooling="mean", dense=[(24, "tanh")]), tmp_path / "ckpt"))
    read_model_spec(folder)  # as made: fine
    for bad in ("../outside", "/etc", "2_Dense/../../x", None, 3):
        with pytest.raises(ModelError):
            module_dir(folder, bad)
    modules = json.loads((folder / "modules.json").read_text())
    dense = next(m for m in modules if m["type"].endswith("Dense"))
    shutil.copytree(folder / dense["path"], tmp_path / "outside")
    dense["path"] = "../outside"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match="leads outside the checkpoint folder"):
        read_model_spec(folder)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_dense_bin_weights_load_without_pickled_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bei.modeling.module import dense_module
    from bei.modeling.spec import DenseLayer

    layer = DenseLayer(path=tmp_path, in_features=4, out_features=2, bias=True, activation="tanh")
    weights = {"linear.weight": torch.ones(2, 4), "linear.bias": torch.zeros(2)}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    module = dense_module(layer)
    assert torch.equal(module[0].weight, torch.ones(2, 4))
    with (tmp_path / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"linear.weight": Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        dense_module(layer)
    assert "pickled code ran" not in capsys.readouterr().out


def test_client_safe_errors_hold_no_paths() -> None:
    error = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /srv/engines/x/model.onnx failed:Protobuf parsing failed.\nline 2"
    )
    text = client_safe(error)
    assert text == "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Load model from <path> failed:Protobuf parsing failed."
    assert client_safe(FileNotFoundError(2, "No such file", "/home/me/tokenizer.json")).endswith("'<path>'")
    assert client_safe(RuntimeError("injected engine failure")) == "RuntimeError: injected engine failure"
    assert len(client_safe(ValueError("x" * 1000))) == 200
