"""ONNX and TorchScript export: the exported files give `cifarlab predict`'s probabilities on the same images."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_tiny_run, write_image_folder

from cifarlab import export
from cifarlab.cli import main
from cifarlab.config import RunConfig
from cifarlab.data.preprocess import Preprocessor
from cifarlab.data.sources import decode_image
from cifarlab.errors import ConfigError
from cifarlab.models import create_model
from cifarlab.train.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# (model, training flags): a plain CNN, a ResNet with an input resize inside, the fast net without its TTA.
MODELS = {
    "tutorial": [],
    "resnet": ["--model-arg", "depth=8", "--input-size", "40"],
    "fast": ["--model-arg", "tta=0"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("export") / "data", train=8, test=2)


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request: pytest.FixtureRequest, data: Path) -> Path:
    return train_tiny_run(data, data.parent / request.param, model=request.param, flags=MODELS[request.param])


def _predicted(checkpoint: Path, data: Path, out: Path) -> tuple[list[str], np.ndarray]:
    """(image paths, probabilities) as `cifarlab predict --csv` writes them for the test images."""
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--csv", str(out),
                 str(data / "test")]) == 0  # fmt: skip
    with open(out) as f:
        rows = list(csv.DictReader(f))
    return [row["path"] for row in rows], np.array([[float(row[f"p_class{k}"]) for k in range(3)] for row in rows])


def test_onnx_and_torchscript_match_predict(checkpoint: Path, data: Path, tmp_path: Path):
    paths, expected = _predicted(checkpoint, data, tmp_path / "predict.csv")
    images = np.stack([decode_image(path, (32, 32)) for path in paths])  # (N, 32, 32, 3) uint8, as predict reads

    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {"images": images})
    assert np.abs(from_onnx - expected).max() < 1e-4
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == ["class0", "class1", "class2"]

    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 0  # fmt: skip
    extra = {"classes.json": ""}
    scripted = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    from_script = scripted(torch.from_numpy(images)).numpy()
    assert np.abs(from_script - expected).max() < 1e-4
    assert list(scripted.classes) == json.loads(extra["classes.json"]) == ["class0", "class1", "class2"]


def test_a_scatter_model_is_refused_naming_its_layer(tmp_path: Path, capsys):
    # An untrained checkpoint at 16 pixels: the refusal depends on the layer only, and the scattering is quick there.
    config = RunConfig.from_dict({"model": {"name": "scatter_linear", "args": {"image_size": 16}}})
    checkpoint = save_checkpoint(tmp_path / "scatter.pt", config=config.to_dict(), classes=["a", "b", "c"],
                                 model_state=create_model("scatter_linear", num_classes=3, image_size=16).state_dict(),
                                 preprocess=Preprocessor("none").state())  # fmt: skip
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "its layer 'scattering' (Scattering2D) computes complex-valued FFTs, which ONNX has no type for" in err
    assert not out.exists()


def test_a_failed_export_names_the_cause_and_writes_nothing(data: Path, tmp_path: Path, monkeypatch, capsys):
    checkpoint = train_tiny_run(data, tmp_path / "run")

    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy", 17, 20)

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    assert "cannot export model 'tutorial' to onnx: Exporting the operator 'aten::fancy'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no file, no temporary left behind
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; choose one of: onnx, torchscript"):
        export.export_checkpoint(checkpoint, format="tflite", out=out)
