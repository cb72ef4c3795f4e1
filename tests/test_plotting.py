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


def test_histogram_panel_shows_the_share_per_bin():
    logits, labels = predictions(seed=3)
    probs = reference.softmax(logits).astype(np.float32)
    figure = plot_reliability_diagram(labels, probs, num_bins=8)
    assert len(figure.axes) == 2
    panel = figure.axes[1]
    weights, confidences, corrects = reference.bin_statistics(labels, probs, 8)
    heights = np.array([patch.get_height() for patch in panel.patches])
    np.testing.assert_allclose(heights, weights / weights.sum(), atol=1e-6)
    lines = sorted(line.get_xdata()[0] for line in panel.get_lines())
    expected = sorted([corrects.sum() / 500, confidences.sum() / 500])
    np.testing.assert_allclose(lines, expected, atol=1e-5)
    plt.close(figure)
    figure = plot_reliability_diagram(labels, probs, num_bins=8, show_histogram=False)
    assert len(figure.axes) == 1
    plt.close(figure)


def test_draws_bins_of_unequal_width_at_their_edges():
    from keras_label_relax import plotting

    stats = {
        "edges": np.array([0.0, 0.5, 0.8, 0.95, 1.0]),
        "weight": np.array([10.0, 0.0, 30.0, 60.0]),
        "confidence": np.array([0.3, np.nan, 0.9, 0.97]),
        "accuracy": np.array([0.2, np.nan, 0.8, 0.99]),
    }
    figure, ax = plt.subplots()
    plotting._draw(ax, stats, 0.05)
    plotting._draw_histogram(plotting._panel_below(ax), stats)
    accuracy_bars = ax.patches[:3]
    assert [bar.get_x() for bar in accuracy_bars] == [0.0, 0.8, 0.95]
    np.testing.assert_allclose(
        [bar.get_width() for bar in accuracy_bars], [0.5, 0.15, 0.05]
    )
    histogram = figure.axes[1].patches
    np.testing.assert_allclose(
        [bar.get_width() for bar in histogram], [0.5, 0.3, 0.15, 0.05]
    )
    np.testing.assert_allclose(
        [bar.get_height() for bar in histogram], [0.1, 0, 0.3, 0.6]
    )
    plt.close(figure)


def test_binning_is_passed_to_the_metric():
    import inspect

    logits, labels = predictions(seed=4)
    figure = plot_reliability_diagram(
        labels, logits, from_logits=True, binning="equal_width"
    )
    metric = ExpectedCalibrationError(from_logits=True)
    metric.update_state(labels, logits)
    assert f"ECE = {float(metric.result()):.4f}" in legend_texts(figure)
    plt.close(figure)
    if "binning" not in inspect.signature(ExpectedCalibrationError).parameters:
        pytest.skip("ExpectedCalibrationError has no `binning` argument yet")
    figure = plot_reliability_diagram(labels, logits, 10, True, binning="equal_mass")
    metric = ExpectedCalibrationError(10, from_logits=True, binning="equal_mass")
    metric.update_state(labels, logits)
    stats = metric.bin_statistics()
    assert f"ECE = {float(metric.result()):.4f}" in legend_texts(figure)
    histogram = figure.axes[1].patches
    np.testing.assert_allclose(
        [bar.get_width() for bar in histogram], np.diff(stats["edges"])
    )
    plt.close(figure)


def test_smooth_diagram_draws_the_metric_curve_and_a_band(tmp_path):
    from keras_label_relax import SmoothCalibrationError
    from keras_label_relax import plot_smooth_reliability_diagram

    logits, labels = predictions(num_samples=1000, seed=5)
    figure = plot_smooth_reliability_diagram(
        labels, logits, from_logits=True, num_bootstrap=20
    )
    path = tmp_path / "smooth.png"
    figure.savefig(path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    metric = SmoothCalibrationError(from_logits=True)
    metric.update_state(labels, logits)
    curve = metric.reliability_curve()
    ax, panel = figure.axes
    texts = legend_texts(figure)
    assert any(f"smECE = {curve['error']:.4f}" in text for text in texts)
    red = [line for line in ax.get_lines() if line.get_label() == "Smoothed accuracy"]
    np.testing.assert_allclose(red[0].get_ydata(), curve["accuracy"], atol=1e-6)
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices
    inside = (vertices[:, 0] > 0.4) & (vertices[:, 0] < 0.9)
    assert np.all(vertices[inside, 1] >= 0) and np.all(vertices[inside, 1] <= 1)
    density = panel.get_lines()[0].get_ydata()
    np.testing.assert_allclose(density, curve["density"], atol=1e-9)
    plt.close(figure)


def test_smooth_band_covers_the_curve_and_narrows_with_data():
    from keras_label_relax import plotting

    rng = np.random.default_rng(6)
    widths = []
    for size in (400, 6400):
        confidence = rng.uniform(0.3, 1.0, size)
        correct = (rng.random(size) < confidence) * 1.0
        from keras_label_relax import SmoothCalibrationError

        metric = SmoothCalibrationError(bandwidth=0.05)
        metric.accumulate(confidence, correct)
        curve = metric.reliability_curve(num_points=50)
        lower, upper = plotting._bootstrap_band(
            metric, (confidence, correct, np.ones(size)), curve, 40, 0.9, rng
        )
        middle = slice(25, 45)
        assert np.all(lower[middle] <= curve["accuracy"][middle] + 1e-9)
        assert np.all(upper[middle] >= curve["accuracy"][middle] - 1e-9)
        widths.append(np.mean(upper[middle] - lower[middle]))
    assert widths[1] < widths[0] / 2


def test_smooth_diagram_arguments():
    from keras_label_relax import plot_smooth_reliability_diagram

    logits, labels = predictions(num_samples=50)
    with pytest.raises(ValueError, match="num_bootstrap.*-1"):
        plot_smooth_reliability_diagram(labels, logits, num_bootstrap=-1)
    with pytest.raises(ValueError, match="confidence_level.*1.5"):
        plot_smooth_reliability_diagram(labels, logits, confidence_level=1.5)
    with pytest.raises(ValueError, match="bandwidth.*-1"):
        plot_smooth_reliability_diagram(labels, logits, bandwidth=-1)
    figure, axes = plt.subplots(1, 2)
    returned = plot_smooth_reliability_diagram(
        labels, logits, True, ax=axes[0], num_bootstrap=0, show_density=False
    )
    assert returned is figure
    assert len(figure.axes) == 2 and not axes[0].collections
    plt.close(figure)
