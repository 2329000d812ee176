"""The protocol: step planning, per-step metrics, head widening, and one tiny end-to-end run on real images."""
import json
import shutil

import pytest
import torch

from cifarlab.config import RunConfig
from cifarlab.continual.protocol import (ProtocolOptions, _widen_head, plan_steps, run_continual, run_protocol,
                                         step_metrics, summarize_method, summary_table)
from cifarlab.continual.state import load_state
from cifarlab.errors import CifarlabError
from cifarlab.hardware import resolve_precision
from cifarlab.models import create_model

NAMES = tuple("abcdefghij")


def test_plan_steps_default_order_groups_and_errors():
    assert plan_steps([0, 1], None, classes=NAMES[:5], group_size=1) == [[0, 1], [2], [3], [4]]
    assert plan_steps([3], [9, 0, 5, 1, 2], classes=NAMES, group_size=2) == [[3], [9, 0], [5, 1], [2]]
    for order, match in (([2, 1], r"class 1 \(b\) is already learned"), ([2, 2], "repeats"), ([10], "does not exist")):
        with pytest.raises(CifarlabError, match=match):
            plan_steps([0, 1], order, classes=NAMES, group_size=1)
    with pytest.raises(CifarlabError, match="unknown continual method"):
        ProtocolOptions(methods=("lda", "svm"))
    with pytest.raises(CifarlabError, match="precision must be one of"):
        ProtocolOptions(precision="fp16")


def test_step_metrics_and_summary_on_a_hand_case():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    seen0 = torch.tensor([True, True, False])
    # Step 0 knows classes 0, 1: class 2 images go to 1. Step 1 learns class 2 but forgets one class-0 image.
    # Two novelty scores, the default first: "good" ranks both class-2 images first, "bad" ranks them last.
    good = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8])
    s0 = step_metrics(torch.tensor([0, 0, 1, 1, 1, 1]), targets, seen0, {"good": good, "bad": -good})
    s1 = step_metrics(torch.tensor([0, 2, 1, 1, 2, 2]), targets, torch.ones(3, dtype=torch.bool),
                      {"good": torch.zeros(6), "bad": torch.zeros(6)})
    assert s0["accuracy"] == pytest.approx(4 / 6) and s0["novelty_auroc"] == 1.0 and s0["novelty_score"] == "good"
    assert s0["novelty"] == {"good": {"auroc": 1.0, "fpr95": 0.0}, "bad": {"auroc": 0.0, "fpr95": 1.0}}
    assert s0["confusion_matrix"].tolist() == [[2, 0, 0], [0, 2, 0], [0, 2, 0]]
    seen = torch.stack([seen0, torch.ones(3, dtype=torch.bool)])
    summary = summarize_method([s0, s1], seen)
    assert summary["accuracy_per_step"] == pytest.approx([4 / 6, 5 / 6])
    assert summary["final_accuracy"] == pytest.approx(5 / 6)
    assert summary["seen_accuracy_per_step"] == pytest.approx([1.0, 5 / 6])
    assert summary["average_incremental_accuracy"] == pytest.approx((1 + 5 / 6) / 2)
    assert summary["forgetting"] == pytest.approx((0.5 + 0.0) / 2)  # class 0: 1 -> 0.5; class 1 kept
    assert summary["novelty_auroc_per_step"] == [1.0, None]  # nothing unseen after the last step
    assert summary["novelty_fpr95_per_step"] == [0.0, None] and summary["novelty_score"] == "good"
    assert summary["novelty"] == {"good": {"auroc_per_step": [1.0, None], "fpr95_per_step": [0.0, None]},
                                  "bad": {"auroc_per_step": [0.0, None], "fpr95_per_step": [1.0, None]}}
    partial = summarize_method([None, s1], seen)  # e.g. the joint baseline: last step only
    assert partial["accuracy_per_step"][0] is None and partial["average_incremental_accuracy"] is None


def test_widen_head_keeps_the_old_rows_and_leaves_the_model_alone():
    model = create_model("tutorial", num_classes=3)
    wide = _widen_head(model, 5)
    assert model.get_classifier().out_features == 3 and wide.get_classifier().out_features == 5
    assert torch.equal(wide.get_classifier().weight[:3], model.get_classifier().weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(wide.eval()(x)[:, :3], model.eval()(x))


def test_end_to_end_on_real_images(small_cifar, tmp_path):
    config = RunConfig.from_dict({
        "data": {"path": str(small_cifar), "crop_padding": 0, "flip": False},
        "model": {"name": "tutorial"},
        "optim": {"optimizer": "sgd", "lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 50, "device": "cpu", "progress": False, "out": str(tmp_path / "base")},
    })
    options = ProtocolOptions(order=(2, 3), methods=("lda",), finetune_epochs=1, joint=True, device="cpu",
                              progress=False)
    summary = run_continual(config, [0, 1], options)
    out = tmp_path / "base" / "continual"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["methods"]) == {"lda", "linear-head", "finetune", "joint"}
    for name, result in summary["methods"].items():
        assert len(result["accuracy_per_step"]) == 3
        assert result["final_accuracy"] == result["accuracy_per_step"][-1]
        assert (out / f"confusion_{name}.png").is_file()
    assert (out / "accuracy_per_step.png").is_file() and (out / "novelty_per_step.png").is_file()
    assert summary["novelty_scores"] == ["mahalanobis", "relative-mahalanobis", "msp", "energy"]
    assert summary["feature_transform"] == "none"
    assert summary["classes_learned_per_step"] == [2, 3, 4]
    assert summary["steps"] == [["airplane", "automobile"], ["bird"], ["cat"]]
    head = summary["methods"]["linear-head"]
    assert len(set(head["accuracy_per_step"])) == 1  # the base head never changes
    assert all(row[2:] == [0.0] * 8 for row in head["per_class_accuracy"])  # and never predicts a new class
    lda = summary["methods"]["lda"]
    assert lda["final_accuracy"] > head["final_accuracy"]  # learning new classes helps on the 10-class test set
    assert [len(row) for row in lda["per_class_accuracy"]] == [10, 10, 10]
    assert lda["novelty_auroc_per_step"][0] is not None
    # every score that applies to the method, per step: AUROC and FPR95; the old key is the default score's
    assert list(lda["novelty"]) == ["mahalanobis", "relative-mahalanobis"] and lda["novelty_score"] == "mahalanobis"
    assert lda["novelty"]["mahalanobis"]["auroc_per_step"] == lda["novelty_auroc_per_step"]
    assert list(head["novelty"]) == ["msp", "energy"] and head["novelty_score"] == "msp"
    for result in (lda, head, summary["methods"]["finetune"]):
        for score in result["novelty"].values():
            assert all(0 <= v <= 1 for v in score["auroc_per_step"] + score["fpr95_per_step"])  # 6 classes unseen
    assert summary["methods"]["joint"]["novelty"]["msp"]["auroc_per_step"][:2] == [None, None]  # last step only
    assert load_state(out / "state.pt").classes == ("airplane", "automobile", "bird", "cat")
    assert summary["backbone"]["precision"] == resolve_precision(torch.device("cpu"), "auto")  # the base run's
    again = run_protocol(tmp_path / "base", ProtocolOptions(order=(2,), methods=("lda",), finetune_epochs=0,
                                                            precision="bf16", device="cpu", progress=False,
                                                            out=str(tmp_path / "bf16"), feature_transform="tukey+l2",
                                                            novelty_scores=("knn", "relative-mahalanobis"),
                                                            knn_bank=30, knn_k=5))
    again_state = load_state(tmp_path / "bf16" / "state.pt")
    assert again_state.backbone.precision == again["backbone"]["precision"] == "bf16"
    assert again_state.feature_transform == again["feature_transform"] == "tukey+l2"
    assert [len(b) for b in again_state.stats.bank] == [30, 30, 30]  # 100 images per class, 30 kept
    assert list(again["methods"]["lda"]["novelty"]) == ["mahalanobis", "relative-mahalanobis", "knn"]
    assert list(again["methods"]["linear-head"]["novelty"]) == ["msp"]  # the default only: no head score asked for
    assert again["methods"]["lda"]["novelty"]["knn"]["auroc_per_step"][0] is not None
    assert [t["images"] for t in summary["seconds_to_add_class"]] == [100] * 4
    torch.manual_seed(123)  # another global generator state: the protocol alone on the saved run agrees
    alone = run_protocol(tmp_path / "base", ProtocolOptions(order=(2, 3), methods=("lda",), finetune_epochs=1,
                                                            device="cpu", progress=False, out=str(tmp_path / "alone")))
    for name in ("lda", "finetune"):
        assert alone["methods"][name]["novelty_auroc_per_step"] == summary["methods"][name]["novelty_auroc_per_step"]
        assert alone["methods"][name]["accuracy_per_step"] == summary["methods"][name]["accuracy_per_step"]
    table = summary_table(summary)
    assert table.splitlines()[0].split()[:3] == ["method", "final", "acc"] and "finetune" in table
    assert "FPR95 % (base)" in table and "relative-mahalanobis" in table
    # the joint run is in ascending class order, so a copy of it serves another class order without training
    shutil.copytree(out / "joint", tmp_path / "reversed" / "joint")
    trained_at = (tmp_path / "reversed" / "joint" / "summary.json").stat().st_mtime_ns
    reversed_order = run_protocol(tmp_path / "base", ProtocolOptions(order=(3, 2), methods=("lda",), finetune_epochs=0,
                                                                     joint=True, device="cpu", progress=False,
                                                                     out=str(tmp_path / "reversed")))
    assert (tmp_path / "reversed" / "joint" / "summary.json").stat().st_mtime_ns == trained_at
    assert reversed_order["methods"]["joint"]["final_accuracy"] == summary["methods"]["joint"]["final_accuracy"]
    assert reversed_order["methods"]["joint"]["per_class_accuracy"] == summary["methods"]["joint"]["per_class_accuracy"]
