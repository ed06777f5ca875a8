"""Report metrics (transferkit.reports.metrics) against sklearn and hand-computed values; the plots write real PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics

from transferkit.errors import TransferkitError
from transferkit.reports.metrics import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    worst_errors,
)


def _random_predictions(n=60, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), rng.dirichlet(np.ones(classes), size=n)


def test_metrics_equal_sklearn():
    y, probs = _random_predictions()
    names = ["a", "b", "c", "d"]
    result = classification_metrics(y, probs, names, topk=(1, 3))
    pred = probs.argmax(1)
    assert result["n"] == 60
    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))
    assert result["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y, pred))
    assert result["macro_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro"))
    assert result["top1_accuracy"] == pytest.approx(result["accuracy"])
    assert result["top3_accuracy"] == pytest.approx(metrics.top_k_accuracy_score(y, probs, k=3))
    assert result["confusion_matrix"] == metrics.confusion_matrix(y, pred).tolist()
    np.testing.assert_allclose(result["confusion_matrix_normalized"],
                               metrics.confusion_matrix(y, pred, normalize="true"))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, pred)
    for i, name in enumerate(names):
        assert result["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]})


def test_topk_only_below_class_count_and_binary_works():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    result = classification_metrics(y, probs, ["neg", "pos"], topk=(1, 3, 5))
    assert result["top1_accuracy"] == result["accuracy"] == 0.5
    assert "top3_accuracy" not in result and "top5_accuracy" not in result


def test_topk_counts_true_class_in_top_k():
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    result = classification_metrics(np.array([0, 1, 2]), probs, ["a", "b", "c"], topk=(2,))
    assert result["top2_accuracy"] == pytest.approx(2 / 3)


def test_ece_known_example():
    # bin (0.8, 0.8667]: confidences 0.85, 0.85 with 1 of 2 right -> |0.5 - 0.85| = 0.35, weight 2/4
    # bin (0.9333, 1.0]: confidences 1.0, 1.0, both right -> gap 0, weight 2/4
    probs = np.array([[0.85, 0.15], [0.15, 0.85], [1.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(y, probs) == pytest.approx(0.5 * 0.35)
    bins = calibration_bins(y, probs)
    assert bins["count"].sum() == 4 and bins["count"][12] == 2 and bins["count"][14] == 2


def test_ece_zero_when_confidence_matches_accuracy():
    # 10 samples at confidence 0.6, 6 right
    probs = np.tile([0.6, 0.4], (10, 1))
    y = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)


def test_absent_class_keeps_full_matrix():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    result = classification_metrics(y, probs, ["a", "b", "c"])
    assert np.array(result["confusion_matrix"]).shape == (3, 3)
    assert result["per_class"]["c"]["support"] == 0
    assert result["confusion_matrix_normalized"][2] == [0.0, 0.0, 0.0]
    pred = probs.argmax(1)
    assert result["macro_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro", zero_division=0))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(TransferkitError, match=r"\[N, 3\]"):
        classification_metrics([0, 1], np.ones((2, 2)) / 2, ["a", "b", "c"])
    with pytest.raises(TransferkitError, match="class indices"):
        classification_metrics([0, 5], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(TransferkitError, match="no samples"):
        classification_metrics([], np.zeros((0, 2)), ["a", "b"])


def test_worst_errors_sorted_by_confidence():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.3, 0.7], [0.9, 0.1], [0.95, 0.05], [0.2, 0.8]])
    errors = worst_errors(["p0", "p1", "p2", "p3"], y, probs, k=5)
    assert [e["path"] for e in errors] == ["p2", "p0"]
    assert errors[0] == {"path": "p2", "true": 1, "pred": 0, "prob": 0.95, "true_prob": 0.05}
    assert len(worst_errors(["p0", "p1", "p2", "p3"], y, probs, k=1)) == 1


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_plots_write_pngs_atomically(tmp_path):
    import torch

    from transferkit.reports import plots

    y, probs = _random_predictions(classes=3)
    cm = metrics.confusion_matrix(y, probs.argmax(1))
    image = tmp_path / "img.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image)
    outputs = [
        plots.confusion_matrix_png(cm, ["a", "b", "c"], tmp_path / "cm.png"),
        plots.confusion_matrix_png(cm, ["a", "b", "c"], tmp_path / "cm_counts.png", normalize=False),
        plots.reliability_png(y, probs, tmp_path / "rel.png"),
        plots.error_gallery_png([{"path": image, "true": 0, "pred": 1, "prob": 0.9},
                                 {"path": tmp_path / "gone.png", "true": "b", "pred": "c", "prob": 0.6}],
                                tmp_path / "errors.png", class_names=["a", "b", "c"]),
        plots.error_gallery_png([], tmp_path / "no_errors.png"),
        plots.training_curves_png([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5, "lr": 1e-3},
                                   {"epoch": "2", "train_loss": "0.7", "val_loss": "", "val_accuracy": "0.6", "lr": "5e-4"}],
                                  tmp_path / "curves.png"),
        plots.filters_png(torch.randn(10, 3, 5, 5), tmp_path / "filters.png"),
        plots.filters_png(torch.randn(4, 8, 3, 3), tmp_path / "filters_gray.png"),
    ]
    for out in outputs:
        width, height = _png_size(out)
        assert width > 100 and height > 50
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(TransferkitError, match="conv weight"):
        plots.filters_png(torch.randn(3, 3), tmp_path / "bad.png")


def _captured_figures(monkeypatch):
    """The matplotlib figures the plot functions build, instead of their PNGs."""
    from transferkit.reports import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figures.append(fig) or out)
    return figures


def test_evaluation_figures_name_the_model_and_split(monkeypatch, tmp_path):
    from transferkit.reports import plots

    subject = plots.evaluation_subject(str(tmp_path / "runs" / "lite0-full-1" / "best.safetensors"), "val", 22)
    assert subject == "lite0-full-1 · val (22 images)"
    assert plots.evaluation_subject("runs:/abc/model", "test") == "runs:/abc/model · test"
    figures = _captured_figures(monkeypatch)
    y, probs = _random_predictions(classes=3)
    plots.confusion_matrix_png(np.eye(3), ["a", "b", "c"], tmp_path / "cm.png", subject=subject)
    plots.reliability_png(y, probs, tmp_path / "rel.png", subject=subject)
    plots.error_gallery_png([], tmp_path / "errors.png", subject=subject)
    cm, reliability, errors = figures
    assert cm.axes[0].get_title() == f"{subject}\nconfusion matrix (row-normalized)"
    assert reliability.axes[0].get_title().startswith(f"{subject}\nreliability (ECE ")
    assert subject in errors.texts[0].get_text()


def test_reliability_gap_is_drawn_beside_not_over_the_accuracy_bar(monkeypatch, tmp_path):
    """One over-confident bin (confidence 0.95, accuracy 0.5) and one under-confident (0.55, accuracy 1): the
    gap runs from the lower of the two to the higher, hatched in the colour of its direction."""
    from matplotlib.colors import to_rgba

    from transferkit.reports import plots

    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    y = np.array([0, 0, 1, 1] + [0, 0, 0, 0])
    figures = _captured_figures(monkeypatch)
    plots.reliability_png(y, probs, tmp_path / "rel.png")
    ax = figures[0].axes[0]
    gaps = [p for p in ax.patches if p.get_hatch()]
    by_x = sorted(gaps, key=lambda p: p.get_x())
    (under, over) = by_x
    assert (under.get_y(), under.get_height()) == pytest.approx((0.55, 0.45))
    assert (over.get_y(), over.get_height()) == pytest.approx((0.5, 0.45))
    assert under.get_edgecolor() == to_rgba("tab:orange") and over.get_edgecolor() == to_rgba("tab:red")
    assert {t.get_text() for t in figures[0].axes[1].texts} == {"4"}  # images per used bin, written on the bar


def test_gallery_gives_each_group_rows_of_its_own(tmp_path):
    from transferkit.reports import plots

    image = tmp_path / "img.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image)
    item = {"path": image, "caption": "x"}
    group_of_3 = [dict(item, caption=f"#0 {side}") for side in ("train/a", "val/a", "test/a")]
    cells, count = plots._gallery_cells([item, group_of_3, [item] * 5, item], columns=4)
    assert count == 4
    assert [(row, column) for row, column, _ in cells] == [
        (0, 0),                                  # a loose item
        (1, 0), (1, 1), (1, 2),                  # every member of the group, on a row of its own
        (2, 0), (2, 1), (2, 2), (2, 3), (3, 0),  # a group longer than a row wraps, and stays apart
        (4, 0)]                                  # the next loose item starts a new row
    assert [cell[2]["caption"] for cell in cells[1:4]] == ["#0 train/a", "#0 val/a", "#0 test/a"]
    out = plots.suspect_gallery_png({"near-duplicate groups": [group_of_3], "outliers": []}, tmp_path / "g.png",
                                    columns=4)
    assert _png_size(out)[0] > 300


def test_audit_scores_are_explained_against_the_thresholds(capsys):
    from types import SimpleNamespace

    from transferkit.cli.data import _explain_audit_scores

    report = SimpleNamespace(threshold=0.95, pixel_threshold=0.99, outlier_cutoff=0.4321, files={},
                             dataset="/data/roads", backbone="tf_efficientnet_lite0")
    _explain_audit_scores(report)
    text = capsys.readouterr().out
    assert "flagged from 0.95 (embedding cosine) or 0.99 (thumbnail correlation)" in text
    assert "flagged above 0.43 (the median + 5 robust standard deviations" in text
    assert "low = likely mislabelled" in text
    assert ("next: transferkit data audit /data/roads --backbone tf_efficientnet_lite0 --write-clean clean.csv"
            in text)
    _explain_audit_scores(SimpleNamespace(**{**vars(report), "files": {"clean_csv": "clean.csv"}}))
    assert "next:" not in capsys.readouterr().out  # already written: no next step to suggest
