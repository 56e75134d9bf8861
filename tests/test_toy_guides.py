"""The guide study (experiments/toy_guides.py): one training run stands for every
training length and EMA length, bit for bit, and its statistics count correctly."""
import pytest
import torch

from script_loader import load_experiment
from toy2d.train import ToyConfig, train


@pytest.fixture(scope="module")
def study():
    return load_experiment("toy_guides")


def test_one_run_gives_every_length_and_ema(study, monkeypatch):
    # the snapshot at t of a longer run, at any tracked sigma_rel, is the t-iteration model of that sigma_rel
    monkeypatch.setattr(study, "ITERATIONS", (3, 6))
    guides = study.train_guides(16, (0.01, 0.10), seed=5)
    assert sorted(guides) == [(3, 0.01), (3, 0.10), (6, 0.01), (6, 0.10)]
    for (iterations, sigma_rel), guide in guides.items():
        alone, _ = train(ToyConfig(width=16, iterations=iterations, ema_sigma_rel=sigma_rel, seed=5))
        for (name, a), b in zip(guide.state_dict().items(), alone.state_dict().values()):
            assert torch.equal(a, b), (iterations, sigma_rel, name)
    # and the lengths and EMA lengths do differ, so the comparison above can fail
    assert not all(torch.equal(a, b) for a, b in zip(guides[3, 0.01].parameters(), guides[6, 0.01].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(guides[6, 0.01].parameters(), guides[6, 0.10].parameters()))


def _row(main, guide, outliers, precision, recall, width=32, w=2.0):
    return dict(main_seed=main, guide_seed=guide, width=width, iterations=512, ema=0.01, weight=w,
                outliers=outliers, precision=precision, recall=recall)


def test_cells_count_pairs_against_their_own_main(study):
    baseline = {"0": dict(outliers=0.10, precision=0.90, recall=0.97), "1": dict(outliers=0.20, precision=0.80, recall=0.96)}
    rows = [_row(0, 0, 0.08, 0.92, 0.90), _row(0, 1, 0.12, 0.91, 0.88),   # main 0: one fewer, both more precise
            _row(1, 0, 0.15, 0.79, 0.86), _row(1, 1, 0.25, 0.85, 0.84)]   # main 1: one fewer, one more precise
    (cell,), none = study.cells(dict(baseline=baseline, rows=rows))
    assert cell["pairs"] == 4
    assert cell["fewer_outliers"] == 2 and cell["higher_precision"] == 3
    assert cell["outliers"]["mean"] == pytest.approx(0.15)
    # the change is against each pair's own main model: -0.02, +0.02, -0.05, +0.05
    assert cell["outliers_change"]["mean"] == pytest.approx(0.0, abs=1e-15)
    assert cell["outliers_change"]["std"] == pytest.approx(torch.tensor([-0.02, 0.02, -0.05, 0.05]).double().std().item())
    assert cell["recall"]["std"] == pytest.approx(torch.tensor([0.90, 0.88, 0.86, 0.84]).double().std().item())
    assert none["outliers"] == [0.10, 0.20]


def test_robust_needs_recall(study):
    baseline = {"0": dict(outliers=0.10, precision=0.90, recall=0.97)}
    rows = [_row(0, g, 0.05, 0.95, 0.70, width=64) for g in range(3)]            # helps always, recall too low
    rows += [_row(0, g, 0.09, 0.91, 0.90, width=16) for g in range(2)]           # helps always, keeps recall
    rows += [_row(0, 2, 0.11, 0.89, 0.90, width=16)]
    rows += [_row(0, g, 0.08, 0.92, 0.88, width=32) for g in range(3)]           # helps always, keeps recall
    best = study.robust(study.cells(dict(baseline=baseline, rows=rows))[0])
    assert best["width"] == 32


def test_robust_is_none_without_recall(study):
    baseline = {"0": dict(outliers=0.10, precision=0.90, recall=0.97)}
    cell_list = study.cells(dict(baseline=baseline, rows=[_row(0, 0, 0.05, 0.95, 0.70)]))[0]
    assert study.robust(cell_list) is None
