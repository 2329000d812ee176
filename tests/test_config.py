from pathlib import Path

import pytest
import torch

from cifarlab.config import RECIPES_DIR, RunConfig, list_recipes, load_recipe, merge
from cifarlab.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    config = RunConfig.from_dict({})
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_is_valid_and_documented(name):
    config = RunConfig.from_dict(load_recipe(name), source=name)
    assert config.recipe == name
    assert list_recipes()[name], f"recipe {name} needs a description comment on its first line"


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {lr: 1e-3}\n")
    assert RunConfig.from_dict(load_recipe(str(path))).optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim": {"optimizer": "rmsprop"}}, "optim.optimizer 'rmsprop' is not valid; choose one of: sgd, adam"),
        ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
        ({"train": {"epoch": 3}}, "unknown key train.epoch; valid:"),
        ({"model": {"name": "resnet19"}}, "unknown model 'resnet19'; valid: cnn"),
        ({"data": {"pad_mode": "edge"}}, "data.pad_mode 'edge' is not valid; choose one of: zero, reflect"),
        ({"data": {"labels": "super"}}, "data.labels 'super' is not valid; choose one of: fine, coarse"),
        ({"data": {"labels": "coarse"}}, "data.labels 'coarse' (--labels coarse) needs data.dataset cifar100 "
                                         "(--dataset cifar100): cifar10 has no coarse labels"),
        ({"data": {"input_size": 4}}, "data.input_size must be an integer >= 8 (pixels per side) or unset, got 4"),
        ({"optim": {"schedule": "multistep"}}, "needs optim.milestones"),
        ({"optim": {"warmup_epochs": 5}, "train": {"epochs": 5}}, "warmup_epochs (5.0) must be below train.epochs"),
        ({"dp": {"enabled": True}}, "exactly one of --target-epsilon or --noise-multiplier"),
        ({"dp": {"enabled": True, "noise_multiplier": 1.0, "delta": 2.0}}, "dp.delta must be in (0, 1)"),
        ({"optim": {"optimizer": "adam", "nesterov": True}}, "nesterov needs optimizer 'sgd'"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(values)
    assert message in str(error.value)


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; valid: .*tutorial"):
        load_recipe("nope")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_recipe(str(path))


def test_merge_overlays_without_mutating_inputs():
    base = {"optim": {"lr": 0.1, "momentum": 0.9}, "model": {"name": "wrn", "args": {"depth": 16}}}
    overrides = {"optim": {"lr": 0.01}, "model": {"args": {"width": 4}}}
    merged = merge(base, overrides)
    assert merged == {"optim": {"lr": 0.01, "momentum": 0.9}, "model": {"name": "wrn", "args": {"depth": 16, "width": 4}}}
    assert base["optim"]["lr"] == 0.1 and "width" not in base["model"]["args"]


def test_recipes_live_inside_the_package():
    assert RECIPES_DIR == Path(__file__).resolve().parents[1] / "cifarlab" / "recipes"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim": {"optimizer": "sgld"}}, "optim.optimizer 'sgld' is not valid"),  # SGLD is a training variant
        ({"optim": {"weight_decay_on": "convs"}}, "optim.weight_decay_on 'convs' is not valid"),
        ({"uncertainty": {"method": "swag"}}, "valid: none, mc-dropout, ensemble, sgld, sgld-dp"),
        ({"uncertainty": {"burn_in": 30}}, "burn_in"),
        ({"uncertainty": {"corruptions": ["fog"]}}, "corruption 'fog' is not valid"),
        ({"uncertainty": {"severities": [6]}}, "severities must be among"),
        ({"continual": {"methods": ["svm"]}}, "method 'svm' is not valid"),
        ({"continual": {"shrinkage": "ledoit"}}, "number in \\[0, 1\\] or 'oas'"),
        ({"continual": {"shrinkage": 2.0}}, "number in \\[0, 1\\] or 'oas'"),
        ({"continual": {"prior": "zipf"}}, "continual.prior 'zipf' is not valid"),
        ({"continual": {"layer": "blocks.13,,penultimate"}}, "layer list 'blocks.13,,penultimate' has an empty name"),
    ],
)
def test_section_values_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)


def test_uncertainty_and_continual_sections_round_trip_from_a_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("uncertainty: {method: sgld-dp, temperature: 0.5, burn_in: 2}\n"
                    "continual: {base_classes: [0, 1], shrinkage: 1e-3, methods: [lda]}\n")
    config = RunConfig.from_dict(load_recipe(str(path)))
    section = config.uncertainty
    assert (section.method, section.temperature, section.burn_in) == ("sgld-dp", 0.5, 2)
    assert config.continual.shrinkage == pytest.approx(1e-3) and config.continual.base_classes == [0, 1]
    assert RunConfig.from_dict({"continual": {"shrinkage": "oas"}}).continual.shrinkage == "oas"
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict({}).optim.weight_decay_on == "all"  # every recipe decays every parameter


def test_names_defined_in_config_are_the_ones_the_layers_above_implement():
    from cifarlab import config
    from cifarlab.continual.classifiers import METHODS, PRIORS
    from cifarlab.data.augment import PAD_MODES
    from cifarlab.data.preprocess import _BUFFERS
    from cifarlab.uncertainty.ood import CORRUPTIONS, SEVERITIES

    assert tuple(_BUFFERS) == config.PREPROCESSORS and PAD_MODES == config.PAD_MODES
    assert tuple(CORRUPTIONS) == config.CORRUPTIONS and SEVERITIES == config.SEVERITIES
    assert tuple(METHODS) == config.CONTINUAL_METHODS and tuple(PRIORS) == config.PRIORS


def test_eval_every_is_a_count_of_epochs_and_0_means_the_last_only():
    assert RunConfig.from_dict({}).train.eval_every == 1  # every epoch
    assert RunConfig.from_dict({"train": {"eval_every": 0}}).train.eval_every == 0
    with pytest.raises(ConfigError, match="train.eval_every must be >= 0, got -1"):
        RunConfig.from_dict({"train": {"eval_every": -1}})
    with pytest.raises(ConfigError, match="train.eval_every must be an integer"):
        RunConfig.from_dict({"train": {"eval_every": True}})


@pytest.mark.parametrize(("section", "expected"), [({}, "bf16"), ({"dp": {"enabled": True, "noise_multiplier": 1.0}}, "fp32"),
                                                   ({"uncertainty": {"method": "sgld-dp"}}, "fp32")])
def test_precision_on_a_native_bf16_cpu_keeps_per_example_clipping_in_fp32(monkeypatch, section, expected):
    from cifarlab import hardware

    monkeypatch.setattr(hardware, "cpu_info", lambda: hardware.CpuInfo(model="x", flags=frozenset({"avx512_bf16"})))
    config = RunConfig.from_dict(merge({"train": {"precision": "auto"}}, section))
    assert config.precision_on(torch.device("cpu")).precision == expected
