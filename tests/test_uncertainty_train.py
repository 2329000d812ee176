"""train_uncertainty / evaluate_run end to end on 1,000 real CIFAR-10 images with the small tutorial net."""
import json

import pytest
import torch

from cifarlab.config import RunConfig
from cifarlab.errors import CheckpointError, ConfigError
from cifarlab.io import read_yaml
from cifarlab.models import create_model
from cifarlab.train.checkpoint import read_checkpoint
from cifarlab.uncertainty.train import comparison_rows, evaluate_run, train_uncertainty



def _config(root, method: str, epochs: int = 2, model: str = "tutorial", **options) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"path": str(root), "val_size": 80, "classes": [0, 1, 2, 3, 4, 5, 6, 7], "download": False},
        "model": {"name": model},
        "optim": {"lr": 0.05, "schedule": "constant", "weight_decay": 5e-4},
        "train": {"epochs": epochs, "batch_size": 50, "device": "cpu", "progress": False},
        "uncertainty": {"method": method, "corruptions": ["contrast"], "severities": [5], "corruption_images": 40,
                        **options},
    })


def _with(config: RunConfig, method: str, **options) -> RunConfig:
    return RunConfig.from_dict({**config.to_dict(), "uncertainty": {**config.to_dict()["uncertainty"],
                                                                    "method": method, **options}})


def test_sgld_run_folder_and_reevaluation(small_cifar, tmp_path):
    summary = train_uncertainty(_config(small_cifar, "sgld", burn_in=0, sgld_lr=0.2), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["sample_0000.pt", "sample_0001.pt"]
    assert summary["posterior_samples"] == 2 and summary["train_images"] == 720  # 8 classes x 100 - 80 val
    assert 0 <= summary["test"]["ece"] <= 1 and summary["temperature"] > 0 and 0 <= summary["ood_auroc"] <= 1
    header, *epochs = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    assert "posterior_samples" in header
    assert all(row[header.index("test_acc")] == "" and row[header.index("val_acc")] for row in epochs)  # test: once
    saved_config = read_yaml(run / "config.yaml")  # saved as it ran: SGLD at sgld_lr, no momentum
    optim = saved_config["optim"]
    assert saved_config["uncertainty"]["method"] == "sgld" and optim["momentum"] == 0 and optim["lr"] == 0.2
    for name in ("config.yaml", "uncertainty.json", "reliability.png", "corruption.png"):
        assert (run / name).is_file()
    saved = json.loads((run / "uncertainty.json").read_text())
    assert saved["ood_images"] == 40 and saved["corruptions"]["contrast"].keys() == {"0", "5"}
    again = evaluate_run(run, device="cpu")  # from the files alone: the same numbers
    assert again["test"] == pytest.approx(saved["test"]) and again["ood_auroc"] == pytest.approx(saved["ood_auroc"])
    with pytest.raises(ConfigError, match="already holds"):
        train_uncertainty(_config(small_cifar, "sgld", burn_in=0), run_dir=run)
    plain, scaled = comparison_rows([run])  # the method's row, then its temperature-scaled one
    assert (plain["method"], scaled["method"]) == ("sgld", "sgld + TS")
    assert plain["ECE %"] == pytest.approx(100 * saved["test"]["ece"])
    assert scaled["ECE %"] == pytest.approx(100 * saved["test_ts"]["ece"])
    assert scaled["acc %"] == plain["acc %"] and scaled["OOD AUROC"] == pytest.approx(saved["ood_auroc_ts"])
    assert plain["corr ECE %"] == pytest.approx(100 * saved["corruptions"]["contrast"]["5"]["ece"])


def test_ensemble_and_sgld_dp(small_cifar, tmp_path):
    ensemble = train_uncertainty(_config(small_cifar, "ensemble", epochs=1, members=2), run_dir=tmp_path / "e")
    assert (tmp_path / "e" / "member_1" / "best.pt").is_file() and ensemble["test"]["accuracy"] > 0
    dp = train_uncertainty(_config(small_cifar, "sgld-dp", epochs=1, burn_in=0), run_dir=tmp_path / "dp")
    assert dp["epsilon"] > 0 and 0 <= dp["clipped_fraction"] <= 1 and dp["posterior_samples"] == 1
    header = (tmp_path / "dp" / "metrics.csv").read_text().splitlines()[0]
    assert "epsilon" in header and "clipped_fraction" in header


def test_mc_dropout_is_the_plain_cnn_with_dropout_on_at_test_time(small_cifar, tmp_path):
    # the same seed trains the same weights; only the prediction differs (dropout masks, averaged)
    config = _config(small_cifar, "none", epochs=1, model="cnn")
    plain = train_uncertainty(config, run_dir=tmp_path / "none")
    mc = train_uncertainty(_with(config, "mc-dropout", passes=3), run_dir=tmp_path / "mc")
    weights = [read_checkpoint(tmp_path / name / "best.pt")["model_state"] for name in ("none", "mc")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert mc["test"]["nll"] != pytest.approx(plain["test"]["nll"], rel=1e-6)


def test_fast_net_gets_its_whitening_fitted_and_mc_dropout(small_cifar, tmp_path):
    # the fast net's whitening layer is fitted to the training images, as `cifarlab train` does (not the identity)
    config = _config(small_cifar, "mc-dropout", epochs=1, model="fast", passes=2)
    config = RunConfig.from_dict({**config.to_dict(), "model": {"name": "fast", "args": {
        "width1": 8, "width2": 8, "width3": 8, "convs_per_block": 1, "tta": 0, "dropout": 0.3}}})
    summary = train_uncertainty(config, run_dir=tmp_path / "mc")
    state = read_checkpoint(tmp_path / "mc" / "best.pt")["model_state"]
    identity = create_model("fast", width1=8, width2=8, width3=8, convs_per_block=1).state_dict()["whiten_weight"]
    assert not torch.allclose(state["whiten_weight"], identity) and summary["test"]["accuracy"] > 0
    with pytest.raises(ConfigError, match="sgld-dp cannot train 'fast'.*statistics of the training images"):
        train_uncertainty(_with(config, "sgld-dp", burn_in=0), run_dir=tmp_path / "dp")
    scatter = RunConfig.from_dict({**config.to_dict(), "model": {"name": "scatter_linear",
                                                                  "args": {"data_norm": True}}})
    with pytest.raises(ConfigError, match="sgld-dp cannot train 'scatter_linear'"):
        train_uncertainty(_with(scatter, "sgld-dp", burn_in=0), run_dir=tmp_path / "dp")
    assert not (tmp_path / "dp").exists()  # refused before anything was written


def test_bad_methods_and_models_are_refused(small_cifar, tmp_path):
    with pytest.raises(ConfigError, match="valid: none, mc-dropout, ensemble, sgld, sgld-dp"):
        train_uncertainty(_config(small_cifar, "swag"), run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="burn_in"):
        train_uncertainty(_config(small_cifar, "sgld", burn_in=2), run_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="mc-dropout needs a model with dropout"):
        train_uncertainty(_config(small_cifar, "mc-dropout"), run_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="not an uncertainty run: config.yaml and uncertainty.json missing"):
        evaluate_run(tmp_path)
    with pytest.raises(CheckpointError, match="uncertainty run folder .*nowhere does not exist"):
        evaluate_run(tmp_path / "nowhere")
