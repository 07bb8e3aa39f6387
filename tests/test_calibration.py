"""Calibration metrics against hand-computed values, bin edges included."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.eval.calibration import bin_index, calibration_metrics


def test_bin_edges_belong_to_the_bin_below():
    conf = torch.tensor([0.0, 0.1, 0.1000001, 0.5, 0.95, 1.0], dtype=torch.float64)
    assert bin_index(conf, 10).tolist() == [0, 0, 1, 4, 9, 9]
    # Five samples in two equal-mass bins: the three least confident, then the other two.
    mass = bin_index(torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7]), 2, "mass")
    assert mass.tolist() == [1, 0, 0, 0, 1]


def test_hand_computed_two_class_example():
    # Confidences 0.6 (bin 5), 0.6 (bin 5), 0.9 (bin 8), 0.75 (bin 7); labels make samples 1
    # and 4 correct. Bin 5: acc 0.5, conf 0.6 → gap 0.1, weight 1/2; bin 8: acc 0, conf 0.9;
    # bin 7: acc 1, conf 0.75.
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.25, 0.75]])
    labels = torch.tensor([0, 0, 1, 1])
    m = calibration_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(0.5 * 0.1 + 0.25 * 0.9 + 0.25 * 0.25)
    assert m["mce"] == pytest.approx(0.9)
    nll = -(math.log(0.6) + math.log(0.4) + math.log(0.1) + math.log(0.75)) / 4
    assert m["nll"] == pytest.approx(nll)
    brier = (2 * 0.4**2 + 2 * 0.6**2 + 2 * 0.9**2 + 2 * 0.25**2) / 4
    assert m["brier"] == pytest.approx(brier)
    # Equal-mass, 2 bins: {0.6, 0.6} (acc 0.5) and {0.75, 0.9} (acc 0.5).
    mass = calibration_metrics(probs, labels, n_bins=2, binning="mass")
    assert mass["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * abs(0.5 - 0.825))


def test_a_perfectly_calibrated_predictor_has_zero_ece():
    # In each group of 10 samples with confidence c, exactly 10·c are right.
    probs, labels = [], []
    for c in (0.3, 0.5, 0.7, 0.9, 1.0):
        row = torch.full((4,), (1 - c) / 3, dtype=torch.float64)
        row[0] = c
        for i in range(10):
            probs.append(row)
            labels.append(0 if i < round(10 * c) else 1 + i % 3)
    m = calibration_metrics(torch.stack(probs), torch.tensor(labels))
    assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["mce"] == pytest.approx(0, abs=1e-12)
    worse = calibration_metrics(torch.stack(probs) ** 0.5 / 2, torch.tensor(labels))
    assert worse["ece"] > 0.05


def test_stats_from_logits_in_chunks_equal_the_metrics_of_the_probabilities():
    from distillery.eval import CalibrationStats

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=gen)
    labels = torch.randint(0, 7, (500,), generator=gen)
    expected = calibration_metrics(torch.softmax(logits.double(), -1), labels)
    stats = CalibrationStats().add_logits(logits[:200], labels[:200])
    stats.add_logits(logits[200:], labels[200:])
    got = stats.metrics()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # Masked-out rows are skipped, as if never added.
    mask = torch.arange(500) % 2 == 0
    masked = CalibrationStats().add_logits(logits, labels, mask).metrics()
    direct = calibration_metrics(torch.softmax(logits[mask].double(), -1), labels[mask])
    assert masked["ece"] == pytest.approx(direct["ece"], abs=1e-6)


def test_reliability_bins_of_the_hand_example():
    from distillery.eval import CalibrationStats

    # float64, so 0.6 is on the edge 6/10 and belongs to bin 5 (in float32 it is just above).
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.25, 0.75]], dtype=torch.float64)
    bins = CalibrationStats().add_probs(probs, torch.tensor([0, 0, 1, 1])).bins(10)
    assert [b["bin"] for b in bins] == [5, 7, 8]
    assert [b["share"] for b in bins] == pytest.approx([0.5, 0.25, 0.25])
    assert [b["accuracy"] for b in bins] == pytest.approx([0.5, 1.0, 0.0])
    assert [b["confidence"] for b in bins] == pytest.approx([0.6, 0.75, 0.9])
    assert (bins[0]["lower"], bins[0]["upper"]) == pytest.approx((0.5, 0.6))


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_the_temperature_labels_were_drawn_at(true_temperature):
    from distillery.eval import fit_temperature

    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(20000, 10, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=gen)[:, 0]
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # Scaling by the fitted temperature lowers the NLL of these over-/under-confident logits.
    before = calibration_metrics(torch.softmax(logits, -1), labels)["nll"]
    after = calibration_metrics(torch.softmax(logits / fitted, -1), labels)["nll"]
    assert after < before


# Twelve predictions in six groups of two (no confidence on a bin edge of five bins).
CONFIDENCE = [0.93, 0.87, 0.83, 0.77, 0.71, 0.65, 0.57, 0.53, 0.47, 0.43, 0.37, 0.31]
CORRECT = [1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0]
NLL = [0.1, 0.2, 1.9, 0.3, 0.4, 1.1, 1.5, 0.6, 0.9, 1.3, 0.8, 1.7]
BRIER = [0.01, 0.04, 0.7, 0.06, 0.1, 0.5, 0.6, 0.3, 0.4, 0.5, 0.45, 0.66]


def _plain_ece(pairs: list[tuple[float, int]], n_bins: int = 5) -> float:
    """ECE written plainly: bin k holds confidences in (k/B, (k+1)/B]; Σ_k share·|acc − conf|."""
    total = 0.0
    for k in range(n_bins):
        inside = [(c, y) for c, y in pairs if int(c * n_bins) == k]
        if inside:
            conf = sum(c for c, _ in inside) / len(inside)
            acc = sum(y for _, y in inside) / len(inside)
            total += len(inside) / len(pairs) * abs(acc - conf)
    return total


def test_bootstrap_ece_interval_matches_resamples_computed_by_hand():
    import numpy as np

    from distillery.eval.calibration import (
        CalibrationStats,
        bootstrap_calibration,
        bootstrap_weights,
        calibration_sums,
    )

    table = torch.tensor([CONFIDENCE, CORRECT, NLL, BRIER], dtype=torch.float64).T  # (12, 4)
    groups = np.repeat(np.arange(6), 2)
    sums = calibration_sums(table, groups, 6, n_bins=5)
    samples, seed = 300, 7
    intervals = bootstrap_calibration([sums], bootstrap_weights(6, samples, seed))
    pairs = list(zip(CONFIDENCE, CORRECT, strict=True))
    whole = CalibrationStats([table]).metrics(5)
    assert intervals["ece"].mean == pytest.approx(_plain_ece(pairs)) == pytest.approx(whole["ece"])
    assert intervals["nll"].mean == pytest.approx(sum(NLL) / 12)
    # The same draws, made here: whole groups resampled, ECE recomputed from its bins each time.
    draws = np.random.default_rng(seed).integers(0, 6, size=(samples, 6))
    by_group = [pairs[2 * g : 2 * g + 2] for g in range(6)]
    eces = sorted(_plain_ece([p for g in row for p in by_group[g]]) for row in draws)
    briers = sorted(sum(BRIER[2 * g] + BRIER[2 * g + 1] for g in row) / 12 for row in draws)
    low, high = math.floor(0.025 * samples), math.ceil(0.975 * samples) - 1  # 7th and 292nd
    assert (intervals["ece"].low, intervals["ece"].high) == pytest.approx((eces[low], eces[high]))
    assert (intervals["brier"].low, intervals["brier"].high) == pytest.approx(
        (briers[low], briers[high])
    )
    assert intervals["ece"].low <= intervals["ece"].mean <= intervals["ece"].high
    assert intervals["ece"].n == 6 and intervals["ece"].method == "bootstrap"
    # Paired against itself: every resample differs by exactly 0; seeded: reproducible.
    itself = bootstrap_calibration([sums], bootstrap_weights(6, samples, seed), [sums])
    assert (itself["ece"].low, itself["ece"].high) == (0.0, 0.0)
    again = bootstrap_calibration([sums], bootstrap_weights(6, samples, seed))
    assert again == intervals


def test_prediction_groups_follow_the_order_of_predictions(corpus, cache_dir):
    import numpy as np

    from distillery.config import DataConfig
    from distillery.distributed import DistEnv
    from distillery.eval import prediction_groups, predictions
    from distillery.recipes.common import prepare_data
    from tests.conftest import tiny_llama

    data = DataConfig(source=str(corpus), seq_len=32, vocab_size=512, cache_dir=cache_dir)
    tokenizer, val = prepare_data(data, DistEnv(), splits=("val",))
    groups = prediction_groups(val, max_batches=2)
    assert groups.tolist() == np.repeat(np.arange(32), 31).tolist()  # 2 × 16 blocks, 31 each

    model = tiny_llama(len(tokenizer))
    count = sum(
        len(labels)
        for _, labels, _ in predictions(model, val, device=torch.device("cpu"), max_batches=2)
    )
    assert count == len(groups)
