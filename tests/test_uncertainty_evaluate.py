"""evaluate_uncertainty with a hand-made predictor whose every number is known in advance."""
import json
import math

import pytest
import torch

from cifarlab.data.sources import Split
from cifarlab.uncertainty.evaluate import evaluate_uncertainty

K = 5


def _split(labels: list[int]) -> Split:
    # every pixel of image i holds 20 + 40 * label: the predictor below can read the class off the image
    values = (20 + 40 * torch.tensor(labels)).to(torch.uint8)
    return Split(values.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous(), torch.tensor(labels))


def _predict(x: torch.Tensor) -> torch.Tensor:
    """0.9 on the class written in the image, 0.025 on the others; uniform for brighter (unknown) images."""
    value = x.mean(dim=(1, 2, 3)) * 255
    cls = ((value - 20) / 40).round().long().clamp(0, K - 1)
    probs = torch.full((len(x), K), 0.1 / (K - 1))
    probs[torch.arange(len(x)), cls] = 0.9
    return torch.where((value > 200)[:, None], torch.full_like(probs, 1 / K), probs)


def test_known_numbers_and_files(tmp_path):
    test = _split([i % K for i in range(50)])
    val_labels = [i % K for i in range(50)]
    wrong = [(c + 1) % K if i < 5 else c for i, c in enumerate(val_labels)]  # 10% of the labels disagree
    val = Split(_split(val_labels).images, torch.tensor(wrong))
    ood = torch.full((20, 3, 8, 8), 250, dtype=torch.uint8)
    results = evaluate_uncertainty(_predict, test=test, preprocess=lambda x: x, val=val, ood_images=ood,
                                   corruptions=["contrast", "gaussian_noise"], severities=[1, 5],
                                   corruption_images=25, out_dir=tmp_path, title="synthetic")
    assert results["test"]["accuracy"] == 1.0
    assert results["test"]["nll"] == pytest.approx(-math.log(0.9))
    assert results["test"]["ece"] == pytest.approx(0.1)  # confidence 0.9, accuracy 1
    assert results["temperature"] == pytest.approx(1.0, abs=0.02)  # val: 90% right at confidence 0.9
    assert results["ood_auroc"] == 1.0 and results["ood_entropy"] == pytest.approx(math.log(K))
    contrast = results["corruptions"]["contrast"]
    assert list(contrast) == ["0", "1", "5"] and results["corruption_images"] == 25
    # a constant image has no contrast to lose: nothing changes, entropy cannot tell them apart
    assert contrast["5"]["accuracy"] == 1.0 and contrast["5"]["auroc_vs_clean"] == 0.5
    # corruptions cannot move a constant image's mean (the predictor's input): every level is the clean one
    assert results["corruption_mean"] == pytest.approx({"accuracy": 1.0, "nll": -math.log(0.9), "ece": 0.1,
                                                        "auroc_vs_clean": 0.5, "nll_ts": results["test_ts"]["nll"],
                                                        "ece_ts": results["test_ts"]["ece"], "auroc_vs_clean_ts": 0.5})
    # one bin of 50 images at confidence 0.9: E |Binomial(50, 0.9) / 50 - 0.9| = 0.0333 (1000 draws: +- 0.0013)
    assert results["test"]["ece_floor"] == pytest.approx(0.0333, abs=0.004)
    saved = json.loads((tmp_path / "uncertainty.json").read_text())
    assert saved["test"] == results["test"]
    for name in ("reliability.png", "corruption.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
