"""Saved classifier state: round trip, adding a class from a folder, bad input leaves the file untouched."""
import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.config import RunConfig
from cifarlab.continual.features import describe_backbone, extract_features
from cifarlab.continual.state import (FORMAT, ContinualState, add_class_from_folder, load_state, save_state,
                                      state_to_dict)
from cifarlab.continual.stats import batch_stats
from cifarlab.continual.transforms import apply_transform
from cifarlab.data.preprocess import fit_preprocessor
from cifarlab.data.sources import load_dataset
from cifarlab.errors import CheckpointError, CifarlabError, DataError
from cifarlab.models import create_model
from cifarlab.train.checkpoint import load_model, save_checkpoint


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = create_model("tutorial", num_classes=2)
    config = RunConfig.from_dict({"model": {"name": "tutorial"}, "data": {"classes": [0, 1]}})
    save_checkpoint(path, config=config.to_dict(), model_state=model.state_dict(),
                    preprocess=fit_preprocessor("normalize", _images(50, seed)).state(), classes=["a", "b"], epoch=0)
    return path


@pytest.fixture()
def saved(tmp_path):
    """A state that learned classes a and b with the backbone of checkpoint base.pt."""
    ckpt = _checkpoint(tmp_path / "base.pt", seed=0)
    loaded = load_model(ckpt)
    model, preprocess = loaded.model, loaded.preprocess
    backbone = describe_backbone(model, preprocess, checkpoint=str(ckpt))
    state = ContinualState.empty(backbone, 84)
    for name, seed in (("a", 1), ("b", 2)):
        state = state.add_class(name, [extract_features(model, _images(30, seed), preprocess=preprocess)],
                                backbone=backbone)
    return save_state(tmp_path / "state.pt", state), model, preprocess


def _folder(path, images):
    path.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path / f"{i:03d}.png")  # lossless
    return path


def test_round_trip_keeps_every_statistic(saved):
    path, _, _ = saved
    state = load_state(path)
    again = load_state(save_state(path.parent / "copy.pt", state))
    a, b = state_to_dict(state), state_to_dict(again)
    assert a["classes"] == ["a", "b"] and a["backbone"] == b["backbone"]
    for key in ("counts", "sums", "scatters", "stream_scatter"):
        assert torch.equal(a[key], b[key])


def test_add_class_from_folder_learns_exactly_the_folder_images(saved, tmp_path):
    path, model, preprocess = saved
    images = _images(12, seed=3)
    new = add_class_from_folder(path, "c", _folder(tmp_path / "c", images), device="cpu", batch_size=5)
    assert new.classes == ("a", "b", "c") and load_state(path).classes == ("a", "b", "c")
    ref = batch_stats(extract_features(model, images, preprocess=preprocess))
    got = load_state(path).stats.per_class[2]
    assert got.count == 12
    # float32 features from batches of 5 vs of FEATURE_BATCH_SIZE: equal up to float32 rounding
    torch.testing.assert_close(got.sum, ref.sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.scatter, ref.scatter, rtol=1e-5, atol=1e-5)


def test_add_class_computes_features_at_the_states_precision(saved, tmp_path):
    path, model, preprocess = saved
    fp32 = load_state(path)
    bf16 = ContinualState(describe_backbone(model, preprocess, precision="bf16", checkpoint=fp32.backbone.checkpoint),
                          fp32.stats)
    save_state(path, bf16)
    images = _images(12, seed=3)
    add_class_from_folder(path, "c", _folder(tmp_path / "c", images), device="cpu")
    got = load_state(path)
    assert got.backbone.precision == "bf16"
    ref = batch_stats(extract_features(model, images, preprocess=preprocess, precision="bf16"))
    assert torch.equal(got.stats.per_class[2].sum, ref.sum)


def test_a_state_saved_before_precision_was_recorded_loads_as_fp32(saved):
    path, _, _ = saved
    payload = state_to_dict(load_state(path))
    del payload["backbone"]["precision"]
    torch.save(payload, path)
    assert load_state(path).backbone.precision == "fp32"


def test_a_folder_of_jpegs_gives_bit_for_bit_the_protocols_statistics(small_cifar, tmp_path):
    """`continual add` on a class folder learns exactly what the protocol learns from the same images loaded as
    a dataset: same decoding, same mirror test-time augmentation, same batches. A checkpoint of the same weights
    without the mirror views is another backbone and is refused."""
    args = {"width1": 8, "width2": 8, "width3": 16, "convs_per_block": 1, "lookahead_every": 0, "tta": 1}
    torch.manual_seed(0)
    model = create_model("fast", num_classes=2, **args)
    preprocess = fit_preprocessor("normalize", _images(50, seed=0))
    for name, tta in (("mirror.pt", 1), ("plain.pt", 0)):
        config = RunConfig.from_dict({"model": {"name": "fast", "args": {**args, "tta": tta}}})
        save_checkpoint(tmp_path / name, config=config.to_dict(), model_state=model.state_dict(),
                        preprocess=preprocess.state(), classes=["a", "b"], epoch=0)
    loaded = load_model(tmp_path / "mirror.pt")
    model, preprocess = loaded.model, loaded.preprocess
    backbone = describe_backbone(model, preprocess, checkpoint=str(tmp_path / "mirror.pt"))
    path = save_state(tmp_path / "state.pt", ContinualState.empty(backbone, 16))
    dataset = load_dataset(str(small_cifar), progress=False)
    bird = dataset.train.images[dataset.train.labels == dataset.classes.index("bird")]
    batch = 30  # 100 images: batches of 30, 30, 30, 10 in both paths
    protocol = ContinualState.empty(backbone, 16).add_class(
        "bird", extract_features(model, bird, preprocess=preprocess, batch_size=batch).split(batch), backbone=backbone)
    with pytest.raises(CheckpointError, match="built on backbone"):
        add_class_from_folder(path, "bird", small_cifar / "train" / "bird", checkpoint=tmp_path / "plain.pt")
    learned = add_class_from_folder(path, "bird", small_cifar / "train" / "bird", device="cpu", batch_size=batch)
    for key in ("counts", "sums", "scatters", "stream_scatter"):
        assert torch.equal(state_to_dict(learned)[key], state_to_dict(protocol)[key]), key


def test_bad_increments_leave_the_saved_state_untouched(saved, tmp_path):
    path, _, _ = saved
    before = path.read_bytes()
    good = _folder(tmp_path / "good", _images(4, seed=5))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = _folder(tmp_path / "broken", _images(2, seed=6))
    (broken / "zz.png").write_bytes(b"not a png")
    other = _checkpoint(tmp_path / "other.pt", seed=9)
    cases = [
        (dict(class_name="a", images_dir=good), "'a' is already learned"),
        (dict(class_name="c", images_dir=empty), "holds no images"),
        (dict(class_name="c", images_dir=tmp_path / "missing"), "does not exist"),
        (dict(class_name="c", images_dir=broken), "not a readable image"),
        (dict(class_name="c", images_dir=good, checkpoint=other), "built on backbone"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CifarlabError, match=match):
            add_class_from_folder(path, device="cpu", **kwargs)
        assert path.read_bytes() == before, kwargs


def test_nan_features_and_other_backbones_are_refused_in_memory(saved):
    path, model, preprocess = saved
    state = load_state(path)
    with pytest.raises(DataError, match="NaN or Inf"):
        state.add_class("c", [torch.full((3, 84), float("nan"))], backbone=state.backbone)
    torch.manual_seed(7)
    other = describe_backbone(create_model("tutorial", num_classes=2), preprocess)
    with pytest.raises(CheckpointError, match="built on backbone"):
        state.add_class("c", [torch.zeros(3, 84)], backbone=other)


def test_damaged_or_foreign_files_are_refused(tmp_path, saved):
    path, _, _ = saved
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    torch.save({"format": FORMAT, "classes": ["a"]}, tmp_path / "partial.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    payload = state_to_dict(load_state(path))
    torch.save({**payload, "sums": payload["sums"][:1]}, tmp_path / "shapes.pt")
    torch.save({**payload, "weights": np.zeros(3)}, tmp_path / "pickled.pt")  # needs unpickling a numpy array
    for name, match in (("junk.pt", "not a cifarlab"), ("partial.pt", "damaged"), ("foreign.pt", "not a cifarlab"),
                        ("shapes.pt", "inconsistent"), ("pickled.pt", "not a cifarlab"), ("none.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=match):
            load_state(tmp_path / name)


def test_the_feature_transform_and_bank_are_saved_and_continual_add_uses_them(saved, tmp_path):
    path, model, preprocess = saved
    plain = load_state(path)
    assert plain.feature_transform == "none" and plain.stats.bank == ()
    state = ContinualState.empty(plain.backbone, 84, feature_transform="tukey+l2", bank_size=8)
    a = extract_features(model, _images(30, 1), preprocess=preprocess)
    state = state.add_class("a", [a], backbone=plain.backbone)
    tukey_path = save_state(tmp_path / "tukey.pt", state)
    loaded = load_state(tukey_path)
    assert loaded.feature_transform == "tukey+l2" and loaded.stats.bank_size == 8
    assert torch.equal(loaded.stats.bank[0], state.stats.bank[0]) and loaded.stats.bank[0].shape == (8, 84)
    images = _images(12, seed=3)
    add_class_from_folder(tukey_path, "c", _folder(tmp_path / "c", images), device="cpu")
    got = load_state(tukey_path)
    features = apply_transform("tukey+l2", extract_features(model, images, preprocess=preprocess).double())
    ref = batch_stats(features)
    torch.testing.assert_close(got.stats.per_class[1].sum, ref.sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.stats.per_class[1].scatter, ref.scatter, rtol=1e-6, atol=1e-6)
    assert got.feature_transform == "tukey+l2" and [len(b) for b in got.stats.bank] == [8, 8]
    torch.testing.assert_close(got.stats.bank[1], features[torch.arange(8) * 12 // 8].float(), rtol=1e-5, atol=1e-5)


def test_a_state_saved_before_transforms_and_banks_loads_as_none_without_a_bank(saved, tmp_path):
    path, _, _ = saved
    payload = state_to_dict(load_state(path))
    for key in ("feature_transform", "bank_size", "bank_counts", "bank"):
        del payload[key]
    torch.save(payload, path)
    old = load_state(path)
    assert old.feature_transform == "none" and old.stats.bank_size == 0 and old.stats.bank == ()
    full = state_to_dict(load_state(path))
    torch.save({**full, "feature_transform": "pca"}, tmp_path / "transform.pt")
    torch.save({**full, "bank_size": 4, "bank_counts": torch.tensor([4, 4]), "bank": torch.zeros(7, 84)},
               tmp_path / "bank.pt")
    for name, match in (("transform.pt", "unknown feature transform 'pca'"), ("bank.pt", "feature bank")):
        with pytest.raises(CheckpointError, match=match):
            load_state(tmp_path / name)
