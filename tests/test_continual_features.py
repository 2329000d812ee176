"""Feature extraction against the obvious forward pass; backbone fingerprints."""
import pytest
import torch
import torch.nn.functional as F

from cifarlab.continual.features import Backbone, check_same_backbone, describe_backbone, extract_features
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = create_model("tutorial_deep", num_classes=3)
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return model, fit_preprocessor("normalize", images), images


def test_features_equal_forward_features_of_the_preprocessed_batch(setup):
    model, preprocess, images = setup
    model.train()  # extraction must switch to eval (dropout/BN) and switch back
    got = extract_features(model, images, preprocess=preprocess, batch_size=5)
    assert model.training
    with torch.no_grad():
        ref = model.eval().forward_features(preprocess(images.float() / 255))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got.shape == (23, 84) and got.dtype == torch.float32
    got[0, 0] = 1.0  # computed under inference_mode, yet returned as an ordinary tensor callers may change


def test_named_layer_is_average_pooled_at_the_preprocessors_input_size(setup):
    _, _, images = setup
    model = create_model("fast", num_classes=3, width1=8, width2=8, width3=16, tta=0)
    preprocess = fit_preprocessor("normalize", images, size=48)  # as for a backbone trained on 48 px inputs
    got = extract_features(model, images, preprocess=preprocess, layer="blocks.6", batch_size=10)
    with torch.no_grad():
        normalised = (images.float() / 255 - preprocess.mean) / preprocess.std
        x = F.interpolate(normalised, size=(48, 48), mode="bilinear", align_corners=False)
        whitened = F.gelu(F.conv2d(x, model.whiten_weight, model.whiten_bias))
        ref = model.eval().blocks[:7](whitened).mean(dim=(2, 3))  # the first block's output, pooled
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got.shape == (23, 8)
    assert describe_backbone(model, preprocess).input_size == 48


def test_unknown_layer_lists_the_layers(setup):
    model, preprocess, images = setup
    with pytest.raises(CifarlabError, match="no layer .conv9.; layers: penultimate, features, features.0"):
        extract_features(model, images, preprocess=preprocess, layer="conv9")


def test_fingerprint_tracks_weights_and_preprocessing(setup):
    model, preprocess, images = setup
    a = describe_backbone(model, preprocess)
    assert a == describe_backbone(model, preprocess) and a.model == "tutorial_deep"
    other = create_model("tutorial_deep", num_classes=3)
    b = describe_backbone(other, preprocess)
    assert b.fingerprint != a.fingerprint
    c = describe_backbone(model, fit_preprocessor("normalize", images[:5]))
    assert c.fingerprint != a.fingerprint
    resized = describe_backbone(model, fit_preprocessor("normalize", images, size=40))
    assert resized.fingerprint != a.fingerprint and resized.input_size == 40 and a.input_size is None
    with pytest.raises(CifarlabError, match="built on backbone"):
        check_same_backbone(a, b)
    with pytest.raises(CifarlabError, match="built on backbone"):
        check_same_backbone(a, Backbone(**{**a.to_dict(), "layer": "features.3"}))
    check_same_backbone(a, Backbone(**{**a.to_dict(), "checkpoint": "moved/best.pt"}))  # location is no identity


def test_bf16_features_run_under_autocast_and_stay_close_to_fp32(setup):
    model, preprocess, images = setup
    fp32 = extract_features(model, images, preprocess=preprocess)
    bf16 = extract_features(model, images, preprocess=preprocess, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # bf16 rounding shows
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05 * fp32.abs().max().item())
    assert torch.equal(bf16, extract_features(model, images, preprocess=preprocess, precision="bf16"))


def test_precision_is_part_of_the_backbone_identity(setup):
    model, preprocess, _ = setup
    fp32 = describe_backbone(model, preprocess)
    bf16 = describe_backbone(model, preprocess, precision="bf16")
    assert fp32.precision == "fp32" and bf16.to_dict()["precision"] == "bf16"
    with pytest.raises(CifarlabError, match="bf16"):
        check_same_backbone(bf16, fp32)
    with pytest.raises(CifarlabError, match="fp32 or bf16, got 'auto'"):
        describe_backbone(model, preprocess, precision="auto")


def test_layer_list_concatenates_the_pooled_layers_and_the_penultimate_features(setup):
    model, preprocess, images = setup
    got = extract_features(model, images, preprocess=preprocess, layer="features.3, penultimate", batch_size=7)
    x = preprocess(images.float() / 255)
    with torch.no_grad():
        model.eval()
        ref = torch.cat([model.features[:4](x).mean(dim=(2, 3)), model.forward_features(x)], dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got.shape == (23, 16 + 84)


def test_inner_layers_are_averaged_over_the_test_time_views_like_the_penultimate_features():
    torch.manual_seed(0)
    model = create_model("fast", num_classes=3, width1=8, width2=8, width3=16, tta=1).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    preprocess = fit_preprocessor("normalize", images)
    got = extract_features(model, images, preprocess=preprocess, layer="blocks.6,penultimate")
    x = preprocess(images.float() / 255)
    inner = []
    hook = model.blocks[6].register_forward_hook(lambda m, i, out: inner.append(out.mean(dim=(2, 3))))
    with torch.no_grad():
        penultimate = model.forward_features(x)
    hook.remove()
    assert len(inner) == 2  # the image and its mirror
    torch.testing.assert_close(got, torch.cat([(inner[0] + inner[1]) / 2, penultimate], dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer, message", [
    ("features.3,,penultimate", "empty name"),
    ("features.3,features.3", "names a layer twice"),
    ("penultimate,conv9", "no layer 'conv9'; layers: penultimate, features"),
])
def test_bad_layer_lists_are_refused_with_the_reason(setup, layer, message):
    model, preprocess, images = setup
    with pytest.raises(CifarlabError, match=message):
        extract_features(model, images, preprocess=preprocess, layer=layer)


def test_a_state_whose_inner_layer_was_read_from_the_first_view_only_refuses_averaged_features(setup):
    model, preprocess, _ = setup
    now = describe_backbone(model, preprocess, layer="features.3")
    assert now.layer_views == "mean" and describe_backbone(model, preprocess).layer_views == ""
    saved_before = Backbone(**{**now.to_dict(), "layer_views": ""})  # a state dict without the field loads like this
    with pytest.raises(CifarlabError, match="first view only.*views averaged"):
        check_same_backbone(saved_before, now)
    penultimate_before = Backbone(**{k: v for k, v in describe_backbone(model, preprocess).to_dict().items()
                                     if k != "layer_views"})
    check_same_backbone(penultimate_before, describe_backbone(model, preprocess))  # unaffected
