"""Priors: a model's `features` saved apart and loaded into a run's model, frozen or not; every mismatch named."""
import pytest
import torch

from cifarlab.config import RunConfig
from cifarlab.errors import ConfigError
from cifarlab.io import save_tensors
from cifarlab.models import create_model
from cifarlab.models.prior import frozen_prior, load_prior, read_prior, save_prior


@pytest.fixture
def prior(tmp_path):
    torch.manual_seed(1)
    return save_prior(tmp_path / "prior.pt", create_model("tutorial"), preprocess="none", facts={"images": 8})


def test_a_frozen_prior_replaces_the_features_and_stops_their_training(prior):
    torch.manual_seed(2)
    model = create_model("tutorial", num_classes=3)  # the classifier's size is not the prior's business
    head = model.fc.weight.clone()
    payload = load_prior(model, prior, freeze=True, preprocess="none")
    assert payload["facts"] == {"images": 8} and payload["model"] == "tutorial"
    for name, value in model.features.state_dict().items():
        assert torch.equal(value, payload["state"][name])
    assert torch.equal(model.fc.weight, head)
    assert all(not p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("features."))


def test_a_prior_to_fine_tune_stays_trainable(prior):
    model = create_model("tutorial")
    load_prior(model, prior, freeze=False, preprocess="none")
    assert all(p.requires_grad for p in model.parameters())


def test_a_missing_file_says_how_to_build_it(tmp_path):
    with pytest.raises(ConfigError, match=r"model.prior .*nope\.pt does not exist; build it first with `cifarlab prior"):
        load_prior(create_model("tutorial"), tmp_path / "nope.pt", freeze=True, preprocess="none")


def test_another_file_is_not_taken_for_a_prior(tmp_path):
    path = save_tensors(tmp_path / "weights.pt", {"state": {}})
    with pytest.raises(ConfigError, match="is not a cifarlab prior"):
        read_prior(path)


def test_a_prior_of_another_model_is_refused_with_both_names(prior):
    with pytest.raises(ConfigError, match="pretrained for model 'tutorial', but the run's model is 'tanh_cnn'"):
        load_prior(create_model("tanh_cnn"), prior, freeze=True, preprocess="none")


def test_a_shape_mismatch_names_the_layer_and_both_shapes(prior, tmp_path):
    payload = read_prior(prior)
    payload["state"]["0.weight"] = torch.zeros(7, 3, 5, 5)
    del payload["state"]["3.bias"]
    bad = save_tensors(tmp_path / "bad.pt", payload)
    with pytest.raises(ConfigError, match=r"bad\.pt does not fit model 'tutorial'.*features\.0\.weight: \(7, 3, 5, 5\) "
                                          r"in the prior, \(6, 3, 5, 5\) in the model; features\.3\.bias missing"):
        load_prior(create_model("tutorial"), bad, freeze=True, preprocess="none")


def test_other_input_preprocessing_is_refused(prior):
    with pytest.raises(ConfigError, match="preprocessed 'none', but the run's data.preprocess is 'normalize'"):
        load_prior(create_model("tutorial"), prior, freeze=True, preprocess="normalize")


def test_a_model_without_features_cannot_hold_a_prior(prior):
    with pytest.raises(ConfigError, match="'resnet18_cifar' has no `features` stack"):
        load_prior(create_model("resnet18_cifar"), prior, freeze=True, preprocess="none")


def test_the_config_checks_its_prior_only_when_asked(prior, tmp_path):
    config = RunConfig.from_dict({"model": {"name": "tutorial", "prior": str(tmp_path / "gone.pt")}})  # no file read
    with pytest.raises(ConfigError, match="gone.pt does not exist"):
        config.check_prior()
    good = RunConfig.from_dict({"model": {"name": "tutorial", "prior": str(prior)}, "data": {"preprocess": "none"}})
    torch.manual_seed(0)
    good.check_prior()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # building the model to check against left the caller's seed alone
    with pytest.raises(ConfigError, match="data.preprocess is 'normalize'"):
        RunConfig.from_dict({"model": {"name": "tutorial", "prior": str(prior)}}).check_prior()


def test_frozen_layers_keep_their_keys_and_let_their_own_outputs_through(prior):
    plain, frozen = create_model("tutorial"), create_model("tutorial")
    load_prior(plain, prior, freeze=False, preprocess="none")
    load_prior(frozen, prior, freeze=True, preprocess="none")
    assert frozen_prior(frozen) is frozen.features and frozen_prior(plain) is None
    assert frozen.state_dict().keys() == plain.state_dict().keys()  # its checkpoints load into the ordinary model
    frozen.load_state_dict(plain.state_dict())
    images = torch.rand(4, 3, 32, 32)
    outputs = frozen.features(images)
    torch.testing.assert_close(outputs, plain.features(images))
    assert frozen.features(outputs) is outputs
    torch.testing.assert_close(frozen(outputs), plain(images))
