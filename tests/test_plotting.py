"""plot_reliability_diagram renders the metric's bins to a PNG."""

import sys

import ece_reference as reference
import numpy as np
import pytest

from keras_label_relax import ExpectedCalibrationError
from keras_label_relax import plot_reliability_diagram

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def predictions(num_samples=500, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((num_samples, num_classes))
    labels = rng.integers(0, num_classes, num_samples)
    return logits.astype(np.float32), labels


def legend_texts(figure):
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_renders_to_png(tmp_path):
    logits, labels = predictions()
    probs = reference.softmax(logits).astype(np.float32)
    figure = plot_reliability_diagram(labels, probs, num_bins=10)
    path = tmp_path / "reliability.png"
    figure.savefig(path)
    plt.close(figure)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert path.stat().st_size > 5000
    expected = reference.calibration_error(labels, probs, 10)
    assert f"ECE = {expected:.4f}" in legend_texts(figure)
    weights, _, _ = reference.bin_statistics(labels, probs, 10)
    counts = sorted(
        int(text.get_text().replace(",", "")) for text in figure.axes[0].texts
    )
    assert counts == sorted(int(w) for w in weights if w > 0)


def test_draws_on_given_axes_from_logits():
    logits, labels = predictions(seed=1)
    figure, axes = plt.subplots(1, 2)
    returned = plot_reliability_diagram(labels, logits, from_logits=True, ax=axes[1])
    assert returned is figure
    assert axes[1].get_legend() is not None
    assert axes[0].get_legend() is None
    metric = ExpectedCalibrationError(from_logits=True)
    metric.update_state(labels, logits)
    texts = [text.get_text() for text in axes[1].get_legend().get_texts()]
    assert f"ECE = {float(metric.result()):.4f}" in texts
    plt.close(figure)


def test_weighted_counts():
    logits, labels = predictions(num_samples=50, seed=2)
    weights = np.full(50, 0.5)
    figure = plot_reliability_diagram(labels, logits, 5, True, sample_weight=weights)
    total = sum(float(text.get_text()) for text in figure.axes[0].texts)
    assert total == pytest.approx(25.0)
    plt.close(figure)


def test_without_matplotlib(monkeypatch):
    logits, labels = predictions(num_samples=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"keras-label-relax\[plot\]"):
        plot_reliability_diagram(labels, logits, from_logits=True)
