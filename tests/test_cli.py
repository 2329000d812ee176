"""The command line end to end, on a small real subset of the JPEG copy of CIFAR-10."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_tiny_run, write_image_folder
from PIL import Image

from cifarlab import hardware
from cifarlab.cli import main
from cifarlab.train import inference
from cifarlab.train.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def trained_run(small_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `cifarlab train` run: cnn_bn on 1,000 training images, 4 epochs (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("runs") / "cnn_bn"
    code = main([
        "train", "--data", str(small_cifar), "--model", "cnn_bn", "--epochs", "4", "--batch-size", "50",
        "--optimizer", "sgd", "--lr", "0.05", "--nesterov", "--schedule", "onecycle", "--label-smoothing", "0.1",
        "--weight-decay", "5e-4", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    return out


def test_train_beats_chance_clearly_and_writes_the_run_folder(trained_run: Path, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.25  # chance is 0.10 on these 200 balanced test images
    assert summary["test_images"] == 200 and summary["train_images"] == 1000
    assert summary["epochs"] == 4 and summary["best_epoch"] == 4 and summary["val_accuracy"] is None
    assert set(summary["per_class_accuracy"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                   "horse", "ship", "truck"}  # fmt: skip
    for key in ("train_seconds", "images_per_second", "device", "num_parameters"):
        assert summary[key]
    for name in ("config.yaml", "metrics.csv", "curves.png", "confusion.png", "report.md", "best.pt", "last.pt"):
        assert (trained_run / name).stat().st_size > 0, name
    with open(trained_run / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_eval_reproduces_the_summary(trained_run: Path, small_cifar: Path, capsys):
    out = trained_run / "eval.json"
    assert main(["eval", "--checkpoint", str(trained_run / "best.pt"), "--data", str(small_cifar), "--device", "cpu",
                 "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert report["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "test accuracy" in capsys.readouterr().out


def test_predict_prints_a_class_and_probabilities(trained_run: Path, small_cifar: Path, tmp_path: Path, capsys):
    image = next((small_cifar / "test" / "ship").iterdir())
    big = tmp_path / "big.png"
    Image.open(image).resize((64, 48)).save(big)  # other sizes are resized to 32x32
    assert main(["predict", "--checkpoint", str(trained_run), "--device", "cpu", str(image), str(big)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("%" in line for line in lines)


def test_a_run_trained_at_64_pixels_evaluates_and_predicts_at_64(small_cifar: Path, tmp_path: Path, monkeypatch,
                                                                  capsys):
    out = tmp_path / "at64"
    assert main([
        "train", "--data", str(small_cifar), "--model", "resnet", "--model-arg", "depth=8", "--input-size", "64",
        "--epochs", "1", "--train-subset", "200", "--batch-size", "50", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]) == 0  # fmt: skip
    assert read_checkpoint(out / "best.pt")["config"]["data"]["input_size"] == 64
    seen = set()  # input sizes the reloaded network is called with
    load = inference.load_model

    def load_and_watch(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.model.register_forward_pre_hook(lambda module, inputs: seen.add(tuple(inputs[0].shape[-2:])))
        return loaded

    monkeypatch.setattr(inference, "load_model", load_and_watch)
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out), "--data", str(small_cifar), "--device", "cpu",
                 "--out", str(report)]) == 0  # fmt: skip
    # the same accuracy as measured at the end of training, at the same input size
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(report.read_text())["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["predict", "--checkpoint", str(out), "--device", "cpu",
                 str(next((small_cifar / "test" / "ship").iterdir()))]) == 0  # fmt: skip
    assert seen == {(64, 64)}


def test_predict_rejects_a_file_that_is_not_an_image(trained_run: Path, tmp_path: Path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", "--checkpoint", str(trained_run), "--device", "cpu", str(bad)]) == 2
    assert "notes.png is not a readable image" in capsys.readouterr().err


def test_resume_extends_a_finished_run(trained_run: Path, tmp_path: Path):
    copy = tmp_path / "resumed"
    copy.mkdir()
    for name in ("last.pt", "best.pt", "config.yaml"):
        (copy / name).write_bytes((trained_run / name).read_bytes())
    assert main(["train", "--resume", str(copy), "--epochs", "5", "--no-progress"]) == 0
    with open(copy / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_resume_refuses_changes_to_the_saved_config(trained_run: Path, capsys):
    assert main(["train", "--resume", str(trained_run), "--lr", "1.0"]) == 2
    assert "only --epochs, --device, --progress, --eval-every may change (got optim.lr)" in capsys.readouterr().err


def test_a_second_run_into_the_same_folder_is_refused(trained_run: Path, small_cifar: Path, capsys):
    assert main(["train", "--data", str(small_cifar), "--out", str(trained_run), "--no-progress"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_compare_prints_one_row_per_run(trained_run: Path, tmp_path: Path, capsys):
    assert main(["compare", str(trained_run), str(trained_run), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("cnn_bn") >= 2
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_data_show_writes_a_grid(small_cifar: Path, tmp_path: Path):
    png = tmp_path / "grid.png"
    assert main(["data", "show", "--data", str(small_cifar), "--count", "16", "--cutout", "8", "--png", str(png)]) == 0
    assert Image.open(png).size[0] > 100


def test_models_and_recipes_list_one_line_each(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 " in out and "wrn " in out and "tutorial " in out
    assert main(["recipes"]) == 0
    assert "resnet18-adam" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop' (choose from"),
        (["train", "--model", "resnet19", "--data", "x"], "unknown model 'resnet19'; valid: cnn, cnn_bn"),
        (["train", "--recipe", "nope"], "unknown recipe 'nope'; valid:"),
        (["train", "--data", "/nonexistent/cifar", "--no-download", "--device", "cpu"], "/nonexistent/cifar"),
        (["train", "--model-arg", "depth"], "--model-arg expects KEY=VALUE"),
        (["train", "--image-size", "0", "--data", "/nonexistent"], "data.image_size must be an integer >= 8"),
        (["train", "--image-size", "-5", "--data", "/nonexistent"], "got -5"),
        (["eval", "--checkpoint", "/nonexistent/best.pt"], "checkpoint /nonexistent/best.pt does not exist"),
        (["train", "--classes", "0,4-1"], "the range '4-1' in '0,4-1' runs backwards; write 1-4"),
    ],
)
def test_bad_input_gets_a_specific_error(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    if "invalid choice" in message:
        assert "adamw" in err  # argparse lists the valid values


def test_python_dash_m_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "cifarlab", "models"], capture_output=True, text=True, check=True)
    assert "resnet18_cifar" in result.stdout


def test_continual_trains_a_base_then_adds_classes_and_a_folder(small_cifar: Path, tmp_path: Path, capsys):
    out = tmp_path / "base"
    assert main([
        "continual", "--data", str(small_cifar), "--model", "tutorial", "--epochs", "1", "--device", "cpu",
        "--no-progress", "--out", str(out), "--base-classes", "0-4", "--increments", "5,6,7,8", "--method", "lda",
        "--method", "ncm", "--finetune-epochs", "0",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "continual" / "summary.json").read_text())
    assert len(summary["methods"]["lda"]["accuracy_per_step"]) == 5  # before any increment + 4 increments
    assert "lda" in capsys.readouterr().out
    state = out / "continual" / "state.pt"
    before = state.read_bytes()
    assert main(["continual", "add", "--state", str(state), "--class-name", "ship", "--images",
                 str(small_cifar / "train" / "ship"), "--device", "cpu"]) == 2  # fmt: skip
    assert "ship" in capsys.readouterr().err and state.read_bytes() == before  # already learned: untouched
    # As a new process, the way users run it: adding a class imports nothing heavy it does not need (start-up
    # time counts against the "one class in seconds" goal).
    heavy = ("matplotlib", "torch._dynamo", "opacus", "scipy")
    code = (f"import sys; from cifarlab.cli import main; code = main(sys.argv[1:]); "
            f"print(code, [m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, "continual", "add", "--state", str(state), "--class-name",
                             "truck", "--images", str(small_cifar / "train" / "truck"), "--device", "cpu"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "learned 'truck'" in result.stdout and result.stdout.splitlines()[-1] == "0 []"


def test_dp_training_reports_its_privacy_and_can_be_audited(small_cifar: Path, tmp_path: Path, capsys):
    out = tmp_path / "dp"
    with pytest.warns(UserWarning, match="replaced 3 BatchNorm2d layer.s. by GroupNorm"):  # the user is told once
        code = main([
            "train", "--data", str(small_cifar), "--model", "cnn_bn", "--epochs", "2", "--batch-size", "100",
            "--train-subset", "400", "--lr", "0.5", "--momentum", "0", "--schedule", "constant", "--weight-decay", "0",
            "--preprocess", "none", "--dp", "--target-epsilon", "8", "--max-grad-norm", "1.0", "--augmult", "2",
            "--ema", "0.9", "--device", "cpu", "--no-progress", "--out", str(out),
        ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 7.5 < summary["epsilon"] <= 8.0 and summary["delta"] == 1e-5 and summary["poisson"] is True
    assert summary["sampling_rate"] == pytest.approx(0.25) and summary["steps"] == 8
    with open(out / "metrics.csv") as f:
        epsilons = [float(r["epsilon"]) for r in csv.DictReader(f)]
    assert epsilons[0] < epsilons[1] == pytest.approx(summary["epsilon"])
    assert main(["eval", "--checkpoint", str(out), "--data", str(small_cifar), "--device", "cpu"]) == 0
    assert main(["privacy", "audit", "--checkpoint", str(out), "--count", "100"]) == 0  # default device: auto
    assert "auc" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x"])
def test_a_bad_thread_count_is_refused_before_any_work(value, capsys, monkeypatch):
    # the data path does not exist either: the thread count must be the error reported
    assert main(["train", "--threads", value, "--data", "/nonexistent/cifar", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--threads must be a whole number of threads >= 1, got {value!r}" in err and "/nonexistent" not in err
    monkeypatch.setenv(hardware.THREADS_ENV, value)
    assert main(["recipes"]) == 2
    assert f"${hardware.THREADS_ENV} must be a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("cpu, precision", [
    (hardware.CpuInfo(model="AVX2 only", flags=frozenset({"avx2"})), "fp32"),
    (hardware.CpuInfo(model="with AMX", flags=frozenset({"avx2", "avx512f", "amx_bf16"})), "bf16"),
], ids=["avx2", "amx"])  # fmt: skip
def test_train_records_and_prints_the_precision_auto_chose(cpu, precision, small_cifar: Path, tmp_path: Path,
                                                            monkeypatch, capsys):
    monkeypatch.setattr(hardware, "cpu_info", lambda: cpu)
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_cifar), "--model", "tutorial", "--epochs", "1", "--train-subset", "100",
                 "--test-subset", "50", "--batch-size", "50", "--device", "cpu", "--no-progress", "--threads", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    expected = hardware.choose_precision(torch.device("cpu"), "auto")
    assert (summary["precision"], summary["precision_reason"]) == (precision, expected.reason)
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    assert header.split()[-1] == "precision" and row.split()[-1] == precision


def _bad_checkpoints(folder: Path) -> dict[str, str]:
    """Files a user might pass as --checkpoint, each with the sentence that must name it."""
    from cifarlab.config import RunConfig
    from cifarlab.models import create_model
    from cifarlab.train.checkpoint import save_checkpoint

    (folder / "notes.txt").write_text("my notes\n")
    (folder / "random.bin").write_bytes(bytes(range(256)) * 8)
    torch.save(create_model("tutorial", num_classes=3).state_dict(), folder / "state_dict.pt")
    torch.save({"weights": [1.5, 2.5], "step": Path("x")}, folder / "pickled.pt")  # a Path needs code to unpickle
    whole = save_checkpoint(folder / "whole.pt", config=RunConfig().to_dict(), classes=["a", "b", "c"],
                            model_state=create_model("tutorial", num_classes=3).state_dict(), preprocess={})
    (folder / "truncated.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return {"notes.txt": "is not a cifarlab checkpoint", "random.bin": "is not a cifarlab checkpoint",
            "state_dict.pt": "is not a cifarlab checkpoint", "pickled.pt": "is not a cifarlab checkpoint",
            "truncated.pt": "is truncated or corrupted"}  # fmt: skip


@pytest.mark.parametrize("command", [["eval", "--out", "{out}"], ["predict", "{image}"], ["privacy", "audit"]])
def test_a_file_that_is_not_a_checkpoint_gets_one_clear_sentence(command: list[str], tmp_path: Path, capsys):
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    out = tmp_path / "eval.json"
    for name, message in _bad_checkpoints(tmp_path).items():
        argv = [part.format(out=out, image=image) for part in command]
        assert main([*argv, "--checkpoint", str(tmp_path / name), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err
        assert f"{tmp_path / name} {message}" in err and "weights_only" not in err, err
        assert err.count("\n") == 1, err  # one sentence, no traceback
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, image folder): the tutorial CNN after one epoch on 60 tiny images."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_image_folder(root / "data", train=20, test=4)
    return train_tiny_run(data, root / "run"), data


def test_predict_reads_folders_in_batches_and_writes_a_csv(tiny_run: tuple[Path, Path], tmp_path: Path, capsys):
    checkpoint, data = tiny_run
    (data / "test" / "notes.txt").write_text("not an image: skipped inside a folder")
    out = tmp_path / "predictions.csv"
    single = data / "train" / "class0" / "0.png"
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--batch-size", "5", "--csv", str(out),
                 str(data / "test"), str(single)]) == 0  # fmt: skip
    assert "wrote 13 predictions" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class", "p_class0", "p_class1", "p_class2"]
    assert [row["path"] for row in rows] == sorted(str(p) for p in (data / "test").rglob("*.png")) + [str(single)]
    probabilities = torch.tensor([[float(row[f"p_class{k}"]) for k in range(3)] for row in rows])
    assert torch.allclose(probabilities.sum(1), torch.ones(len(rows)), atol=1e-5)
    assert [row["class"] for row in rows] == [f"class{k}" for k in probabilities.argmax(1).tolist()]
    # One batch or three: the same probabilities (up to float rounding).
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--csv", str(tmp_path / "one.csv"),
                 str(data / "test"), str(single)]) == 0  # fmt: skip
    with open(tmp_path / "one.csv") as f:
        at_once = torch.tensor([[float(row[f"p_class{k}"]) for k in range(3)] for row in csv.DictReader(f)])
    assert torch.allclose(at_once, probabilities, atol=1e-6)


def test_predict_names_an_empty_folder_and_an_unreadable_image(tiny_run: tuple[Path, Path], tmp_path: Path, capsys):
    checkpoint, _ = tiny_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    out = tmp_path / "out.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--csv", str(out), str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} holds no image files" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "broken" / "a.png")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", "--checkpoint", str(checkpoint), "--csv", str(out), str(tmp_path / "broken")]) == 2
    assert f"{tmp_path / 'broken' / 'b.jpg'} is not a readable image" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty"]


def test_a_folder_of_mixed_sizes_trains_with_image_size_and_predicts_alike(tmp_path: Path, capsys):
    from cifarlab.data.sources import decode_image
    from cifarlab.train.checkpoint import load_model

    data = write_image_folder(tmp_path / "data", train=6, test=2)
    wide = tmp_path / "data" / "train" / "class1" / "wide.png"
    Image.fromarray(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy()).save(wide)
    assert main(["train", "--data", str(data), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "no")]) == 2
    assert "pass --image-size N" in capsys.readouterr().err and not (tmp_path / "no").exists()
    checkpoint = train_tiny_run(data, tmp_path / "run", flags=["--image-size", "32"])
    assert read_checkpoint(checkpoint)["config"]["data"]["image_size"] == 32
    out = tmp_path / "wide.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--csv", str(out), str(wide)]) == 0
    with open(out) as f:
        predicted = torch.tensor([float(v) for k, v in next(csv.DictReader(f)).items() if k.startswith("p_")])
    # predict decodes the image as training did: shorter side to 32, then the centre 32 x 32 (not stretched).
    loaded = load_model(checkpoint)
    image = torch.from_numpy(decode_image(wide, (32, 32), crop=True).copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = loaded.model(loaded.preprocess.from_uint8(image)).softmax(1)[0]
    assert torch.allclose(predicted, expected, atol=1e-6)


def test_bench_evaluates_every_epoch_unless_told_otherwise(tmp_path: Path, capsys):
    data = write_image_folder(tmp_path / "data", train=8, test=4)
    recipe = tmp_path / "sparse.yaml"  # a recipe that evaluates after its last epoch only, as the fast ones do
    recipe.write_text("model: {name: tutorial}\ntrain: {epochs: 2, batch_size: 8, device: cpu, eval_every: 0}\n")
    bench = ["bench", "--recipe", str(recipe), "--data", str(data), "--seeds", "1", "--thresholds", "0.0",
             "--no-progress", "--csv", str(tmp_path / "bench.csv")]
    assert main(bench) == 0 and main([*bench, "--eval-every", "0"]) == 0
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["eval_every"], float(r["epoch_mean"])) for r in rows] == [("1", 1.0), ("0", 2.0)]
    assert rows[0]["machine"] == hardware.machine_name(torch.device("cpu")) and rows[0]["timed"] == "setup+train+eval"


def test_continual_novelty_flags_reach_the_config_and_bad_scores_stop_before_any_work(tmp_path: Path, capsys):
    from cifarlab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["continual", "--novelty-score", "all", "--knn-bank", "200", "--knn-k", "5",
                                      "--feature-transform", "tukey+l2"])  # fmt: skip
    section = config_from_args(args).continual
    assert section.novelty_scores == ["mahalanobis", "relative-mahalanobis", "knn", "msp", "energy"]
    assert (section.knn_bank, section.knn_k, section.feature_transform) == (200, 5, "tukey+l2")
    picked = config_from_args(build_parser().parse_args(["continual", "--novelty-score", "msp, energy"]))
    assert picked.continual.novelty_scores == ["msp", "energy"]
    missing = str(tmp_path / "no-run")  # never read: the flags are refused first
    assert main(["continual", "--run", missing, "--novelty-score", "mahalanobis,odin"]) == 2
    assert "'odin' is not valid; choose one of: mahalanobis, relative-mahalanobis, knn" in capsys.readouterr().err
    assert main(["continual", "--run", missing, "--novelty-score", "all"]) == 2
    assert "needs a feature bank" in capsys.readouterr().err


def test_continual_refuses_a_bad_plan_layer_or_folder_before_the_backbone_trains(small_cifar: Path, tmp_path: Path,
                                                                                  capsys, monkeypatch):
    from cifarlab.continual import protocol

    monkeypatch.setattr(protocol, "train_base", lambda *a, **k: pytest.fail("the backbone must not train"))
    common = ["continual", "--data", str(small_cifar), "--model", "fast", "--model-arg", "width1=8",
              "--model-arg", "width2=8", "--model-arg", "width3=8", "--no-progress", "--base-classes", "0-4"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for extra, message in [
        (["--increments", "4,5"], "increment class 4 (deer) is already learned: it is a base class"),
        (["--layer", "blocks.99"], "model has no layer 'blocks.99'; layers: penultimate, blocks, blocks.0,"),
        (["--continual-out", str(a_file / "out")], f"cannot write the continual output folder {a_file / 'out'}"),
    ]:
        assert main(common + extra) == 2
        assert message in capsys.readouterr().err


def test_run_folder_and_flag_mistakes_stop_before_any_work(tmp_path: Path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    missing = str(tmp_path / "no-data")  # never read: the mistakes are found first
    assert main(["train", "--data", missing, "--out", str(a_file / "run")]) == 2
    assert f"cannot write the run folder {a_file / 'run'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main(["train", "--data", missing, "--optimizer", "sgd", "--muon-lr", "0.1"]) == 2
    assert "--muon-lr applies to optimizer muon only; this run's optimizer is 'sgd'" in capsys.readouterr().err


def test_eval_and_export_name_a_bad_subset_or_output_folder(tiny_run: tuple[Path, Path], tmp_path: Path, capsys):
    checkpoint, data = tiny_run
    for size in ("0", "13"):  # the folder has 3 classes x 4 test images
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--test-subset", size]) == 2
        assert "the test subset must be 1 to 12 images (the test images of image-folder:" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                 "--out", str(a_file / "model.pt")]) == 2
    assert f"cannot write the export folder {a_file}: {a_file} is a file, not a folder" in capsys.readouterr().err
