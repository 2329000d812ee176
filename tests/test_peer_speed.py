"""benchmarks/peer_speed.py: reading the peer's output, finding its script, and the side-by-side arithmetic.

tests/data/airbench94_cpu_output.txt is the peer's real stdout, captured from
`python ../shared/peers/airbench94-cpu/airbench94_cpu.py --epochs 2 --train-subset 2048 --test-subset 1000 --runs 2
--threads 2` (its first run on the machine, so it also decoded the data).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path(__file__).parent / "data" / "airbench94_cpu_output.txt"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("peer_speed", ROOT / "benchmarks" / "peer_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_speed"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


peer_speed = _load_benchmark()


def test_reads_the_peers_real_output():
    output = peer_speed.parse_peer_output(OUTPUT.read_text())
    assert (output.threads, output.dtype, output.epochs) == (2, "fp32", 2.0)
    first, second = output.runs
    assert first.epoch_seconds == [44.3945, 37.1909] and first.epoch_acc == [0.4980, 0.7330]
    assert first.tta_acc == 0.7360 and first.accuracies == [0.4980, 0.7360]  # the last epoch counts with its TTA
    assert (first.train_seconds, first.init_seconds, first.tta_seconds, first.train_images) == (81.59, 0.65, 40.22,
                                                                                                 4096)
    assert second.epoch_acc == [0.4310, 0.7360] and second.tta_acc == 0.7490 and second.train_seconds == 99.19


def test_the_peers_thresholds_and_csv_rows_come_from_its_epochs():
    output = peer_speed.parse_peer_output(OUTPUT.read_text())
    peer = peer_speed.peer_side("airbench94", output, common={"device": "cpu", "timed": "train"}, data=Path("d"))
    assert peer.hits(0.45) == [(1, 44.3945), (2, pytest.approx(51.4496 + 47.7441))]
    assert peer.seconds_to(0.45) == pytest.approx((44.3945 + 51.4496 + 47.7441) / 2)
    assert peer.seconds_to(0.74) is None  # the first run ends at 73.6% with TTA
    assert peer.images_per_second == pytest.approx(2 * 4096 / (44.3945 + 37.1909 + 51.4496 + 47.7441))
    low, high = peer.csv_rows([0.45, 0.74])
    assert low["recipe"] == "peer:airbench94" and low["reached"] == 2 and low["epoch_mean"] == 1.5
    assert high["reached"] == 1 and high["seconds_mean"] == pytest.approx(51.4496 + 47.7441)
    assert low["final_acc_mean"] == pytest.approx((0.7360 + 0.7490) / 2) and low["threads"] == 2


def test_tables_show_each_side_and_ours_over_the_peers_ratios():
    peer = peer_speed.peer_side("airbench94", peer_speed.parse_peer_output(OUTPUT.read_text()), common={},
                                data=Path("d"))
    ours = peer_speed.Side(name="fast-cpu", accuracies=[[0.6, 0.8]], epoch_seconds=[[10.0, 10.0]],
                           train_images=[4000], precision="fp32", device="cpu", fixed={})
    sides = peer_speed.side_table([peer, ours], [0.45, 0.74])
    assert "peer:airbench94" in sides and "- (1/2)" in sides and "200" in sides  # images/s of ours
    ratios = peer_speed.ratio_table(peer, [ours], [0.45, 0.74]).splitlines()[-1]
    train_ratio = 20.0 / ((44.3945 + 37.1909 + 51.4496 + 47.7441) / 2)
    assert ratios.startswith("fast-cpu / peer:airbench94") and f"{train_ratio:.4f}" in ratios
    assert float(ratios.split()[-1]) == pytest.approx(100 * (0.8 - 0.7425))  # the accuracy difference in points


def _expect_unreadable(text: str, problem: str) -> str:
    with pytest.raises(peer_speed.PeerError, match=problem) as caught:
        peer_speed.parse_peer_output(text)
    message = str(caught.value)
    assert "cannot read airbench94's output" in message and "Expected a header row" in message
    return message


def test_garbled_output_is_a_clear_error_quoting_its_tail():
    message = _expect_unreadable("Traceback (most recent call last):\nRuntimeError: out of memory\n",
                                 "no run summary line was found")
    assert message.endswith("Its last lines:\n    Traceback (most recent call last):\n    RuntimeError: out of memory")
    lines = OUTPUT.read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("run summary"))
    _expect_unreadable("\n".join(lines[:cut]), "its last run has 2 epoch rows but no run summary")
    renamed = OUTPUT.read_text().replace("train_seconds=", "loop_seconds=")
    _expect_unreadable(renamed, "the run summary on line 10 lacks train_seconds")
    _expect_unreadable(OUTPUT.read_text().replace("44.3945", "fast"), "line 6 is not a row of numbers")
    _expect_unreadable(OUTPUT.read_text().replace("val_acc  |  tta", "acc  |  tta"), "header .* lacks val_acc")


def test_a_missing_peer_script_names_where_it_was_looked_for_and_the_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(peer_speed.PEERS, "airbench94", Path("..") / "nowhere" / "airbench94_cpu.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(peer_speed.PeerError, match=r"no script at .*nowhere/airbench94_cpu\.py.*--peer-script PATH"):
        peer_speed.peer_script("airbench94", None)
    with pytest.raises(peer_speed.PeerError, match="--peer-script missing.py is not a file"):
        peer_speed.peer_script("airbench94", "missing.py")
    with pytest.raises(peer_speed.PeerError, match="unknown peer 'airbench95'; valid: airbench94"):
        peer_speed.peer_script("airbench95", None)
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert peer_speed.main(["--recipes", "fast-cpu", "--data", str(tmp_path / "data"), "--threads", "1"]) == 2
    assert "peer_speed: error: airbench94: no script at" in capsys.readouterr().err
