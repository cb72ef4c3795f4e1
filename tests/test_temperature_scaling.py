"""TemperatureScaling: the fit, the calibrated outputs and serialisation."""

import math

import ece_reference as reference
import keras
import numpy as np
import pytest
from keras import ops

from keras_label_relax import TemperatureScaling
from keras_label_relax.calibration import PAPER_GRID
from keras_label_relax.calibration import fit_temperature_nll
from keras_label_relax.calibration import nll

NUM_CLASSES = 10


def calibrated_logits(num_samples=40_000, seed=0, scale=2.0):
    """Logits and labels drawn from softmax(logits): calibrated at T = 1."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((num_samples, NUM_CLASSES))
    cumulative = reference.softmax(logits).cumsum(axis=-1)
    labels = (cumulative > rng.random(num_samples)[:, None]).argmax(axis=-1)
    return logits, labels


def numpy_temperature_fit(logits, labels, sample_weight=None, rtol=1e-8):
    """The package's former fit, in numpy: the reference the compiled fit
    must agree with to 1e-6 relative.

    A Newton iteration on the derivative of the NLL in `s = 1 / T`, kept
    inside a shrinking bracket over T in [0.01, 100]; per-row passes in
    float32, combined in float64.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted64 = logits - logits.max(axis=-1, keepdims=True)
    label_logit = np.take_along_axis(shifted64, labels[:, None], axis=-1)[:, 0]
    shifted = shifted64.astype(np.float32)
    if sample_weight is None:
        weights = np.full(len(labels), 1.0 / len(labels))
    else:
        weights = np.asarray(sample_weight, np.float64) / np.sum(sample_weight)

    def derivatives(s):
        exp = np.exp(np.maximum(shifted * np.float32(s), np.float32(-80.0)))
        partition = exp.sum(axis=-1).astype(np.float64)
        weighted = exp * shifted
        mean_logit = weighted.sum(axis=-1) / partition
        mean_square = np.einsum("ij,ij->i", weighted, shifted) / partition
        slope = weights @ (mean_logit - label_logit)
        return slope, weights @ (mean_square - mean_logit**2)

    lo, hi = 1e-2, 1e2
    unvisited_bounds = {lo, hi}
    s = 1.0
    for _ in range(200):
        unvisited_bounds.discard(s)
        slope, curvature = derivatives(s)
        if slope > 0:
            hi = s
        elif slope < 0:
            lo = s
        if slope == 0 or hi - lo <= rtol * lo:
            break
        s_new = s - slope / curvature if curvature > 0 else math.inf
        if not lo < s_new < hi:
            bound = lo if s_new <= lo else hi
            s_new = bound if bound in unvisited_bounds else math.sqrt(lo * hi)
        converged = abs(s_new - s) <= rtol * s
        s = s_new
        if converged:
            break
    return float(np.clip(1.0 / s, 1e-2, 1e2))


def identity_model(num_classes=NUM_CLASSES):
    return keras.Sequential([keras.Input((num_classes,)), keras.layers.Identity()])


def softmax_model(num_classes=NUM_CLASSES):
    return keras.Sequential(
        [keras.Input((num_classes,)), keras.layers.Activation("softmax")]
    )


@pytest.mark.parametrize("multiple", [0.5, 2.5])
def test_recovers_a_known_multiple(multiple):
    logits, labels = calibrated_logits()
    scaled = TemperatureScaling(identity_model())
    inputs = (multiple * logits).astype(np.float32)
    temperature = scaled.calibrate(inputs, labels, batch_size=8192)
    assert temperature == pytest.approx(multiple, rel=0.01)
    assert scaled.temperature == pytest.approx(temperature, rel=1e-6)


def test_nll_fit_is_the_exact_minimum():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    logits, labels = calibrated_logits(num_samples=5000, seed=1)
    logits = 1.7 * logits
    fitted = fit_temperature_nll(logits, labels)
    found = scipy_optimize.minimize_scalar(
        lambda log_t: nll(logits, labels, np.exp(log_t)),
        bounds=(np.log(0.01), np.log(100.0)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert fitted == pytest.approx(np.exp(found.x), rel=1e-4)
    assert nll(logits, labels, fitted) <= found.fun + 1e-12


@pytest.mark.parametrize(
    "multiple, num_samples, num_classes, weighted",
    [
        (1.0, 100_000, 10, False),
        (0.4, 20_000, 100, False),
        (3.0, 20_000, 3, True),
        (1e3, 500, 4, False),
        (1e-3, 500, 4, False),
    ],
)
def test_compiled_fit_agrees_with_the_numpy_fit(
    multiple, num_samples, num_classes, weighted
):
    rng = np.random.default_rng(int(100 * multiple) + num_classes)
    logits = 2.0 * rng.standard_normal((num_samples, num_classes))
    cumulative = reference.softmax(logits).cumsum(axis=-1)
    labels = (cumulative > rng.random(num_samples)[:, None]).argmax(axis=-1)
    logits = (multiple * logits).astype(np.float32)
    weights = rng.random(num_samples) if weighted else None
    expected = numpy_temperature_fit(logits, labels, weights)
    fitted = fit_temperature_nll(logits, labels, weights)
    assert fitted == pytest.approx(expected, rel=1e-6)


def test_agrees_with_netcal():
    # netcal fits the multiplier 1 / T of the log-probabilities by maximum
    # likelihood (installed with --no-deps, beside its pyro and gpytorch).
    netcal_scaling = pytest.importorskip("netcal.scaling")
    logits, labels = calibrated_logits(num_samples=5000, seed=12, scale=1.0)
    logits = 1.7 * logits
    probs = reference.softmax(logits)
    theirs = netcal_scaling.TemperatureScaling(method="mle")
    theirs.fit(probs, labels, tensorboard=False)
    their_temperature = 1.0 / float(np.ravel(theirs.temperature)[0])
    ours = fit_temperature_nll(logits.astype(np.float32), labels)
    assert ours == pytest.approx(their_temperature, rel=1e-4)
    assert nll(logits, labels, ours) <= nll(logits, labels, their_temperature) + 1e-9


def test_non_finite_outputs_are_an_error_not_temperature_one():
    logits, labels = calibrated_logits(num_samples=200)
    logits = logits.astype(np.float32)
    logits[3, 4] = np.nan
    scaled = TemperatureScaling(identity_model())
    with pytest.raises(ValueError, match=r"`x`.*finite.*1 non-finite.*nan"):
        scaled.calibrate(logits, labels)
    with pytest.raises(ValueError, match=r"`x`.*finite"):
        scaled.calibrate(logits, labels, method="ece_grid")
    assert scaled.temperature == 1.0


def test_weighted_fit_equals_repeated_samples():
    logits, labels = calibrated_logits(num_samples=3000, seed=2)
    counts = np.random.default_rng(3).integers(0, 3, len(labels))
    repeated = fit_temperature_nll(
        np.repeat(logits, counts, axis=0), np.repeat(labels, counts)
    )
    weighted = fit_temperature_nll(logits, labels, sample_weight=counts)
    assert weighted == pytest.approx(repeated, rel=1e-6)


def test_minimum_beyond_the_bounds_returns_the_bound():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((500, 4))
    # Every label the least likely class: the best temperature is infinite.
    assert fit_temperature_nll(logits, logits.argmin(axis=-1)) == 100.0
    # Every top class right: the best temperature is 0.
    assert fit_temperature_nll(logits, logits.argmax(axis=-1)) == 0.01


def test_ece_grid_picks_the_grid_value_with_the_lowest_ece():
    logits, labels = calibrated_logits(num_samples=20_000, seed=5)
    logits = 1.5 * logits
    scaled = TemperatureScaling(identity_model())
    temperature = scaled.calibrate(
        logits.astype(np.float32), labels, method="ece_grid", batch_size=8192
    )
    errors = [
        reference.calibration_error(labels, reference.softmax(logits / t), 15)
        for t in PAPER_GRID
    ]
    assert temperature == PAPER_GRID[int(np.argmin(errors))]
    assert temperature == 1.5
    grid = [0.8, 1.45, 3.0]
    custom = scaled.calibrate(logits, labels, method="ece_grid", grid=grid)
    assert custom == 1.45


def test_outputs_are_softmax_of_scaled_logits():
    logits, _ = calibrated_logits(num_samples=64)
    logits = logits.astype(np.float32)
    scaled = TemperatureScaling(identity_model())
    scaled.temperature = 2.0
    probs = ops.convert_to_numpy(scaled(logits))
    np.testing.assert_allclose(probs, reference.softmax(logits / 2.0), atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(-1), logits.argmax(-1))


def test_probability_model_matches_logit_model():
    logits, labels = calibrated_logits(num_samples=20_000, seed=6)
    logits = (1.8 * logits).astype(np.float32)
    from_logits = TemperatureScaling(identity_model())
    from_probs = TemperatureScaling(softmax_model(), from_logits=False)
    t_logits = from_logits.calibrate(logits, labels, batch_size=8192)
    t_probs = from_probs.calibrate(logits, labels, batch_size=8192)
    assert t_probs == pytest.approx(t_logits, rel=1e-4)
    np.testing.assert_allclose(
        ops.convert_to_numpy(from_probs(logits[:32])),
        ops.convert_to_numpy(from_logits(logits[:32])),
        atol=1e-5,
    )


def test_wrapped_model_is_frozen():
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(NUM_CLASSES)])
    scaled = TemperatureScaling(base)
    assert [w.name for w in scaled.trainable_weights] == ["log_temperature"]
    assert len(scaled.non_trainable_weights) == 2


def test_fit_trains_only_the_temperature():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(NUM_CLASSES)])
    kernel = ops.convert_to_numpy(base.layers[0].kernel)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((128, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, 128)
    scaled = TemperatureScaling(base)
    scaled.compile(
        optimizer=keras.optimizers.Adam(0.1), loss="sparse_categorical_crossentropy"
    )
    scaled.fit(x, y, batch_size=128, epochs=10, verbose=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(base.layers[0].kernel), kernel)
    # Labels unrelated to the inputs: the NLL asks for a higher temperature.
    assert scaled.temperature > 1.5


def test_save_and_load_keep_temperature_and_outputs(tmp_path):
    keras.utils.set_random_seed(1)
    base = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(4)]
    )
    scaled = TemperatureScaling(base, name="calibrated")
    scaled.temperature = 1.7
    x = np.random.default_rng(8).standard_normal((16, 3)).astype(np.float32)
    expected = ops.convert_to_numpy(scaled(x))
    path = tmp_path / "calibrated.keras"
    scaled.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, TemperatureScaling)
    assert restored.name == "calibrated"
    assert restored.temperature == pytest.approx(1.7, rel=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(restored(x)), expected, atol=1e-6)
    assert restored.get_config()["from_logits"] is True


def test_datasets_and_generators_give_the_array_fit():
    logits, labels = calibrated_logits(num_samples=4000, seed=9)
    logits = (2.0 * logits).astype(np.float32)
    scaled = TemperatureScaling(identity_model())
    expected = scaled.calibrate(logits, labels, batch_size=1000)
    batches = [
        (logits[i : i + 1000], labels[i : i + 1000]) for i in range(0, 4000, 1000)
    ]
    assert scaled.calibrate(iter(batches)) == pytest.approx(expected, rel=1e-6)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return batches[index]

    assert scaled.calibrate(Batches()) == pytest.approx(expected, rel=1e-6)
    tf = pytest.importorskip("tensorflow")
    dataset = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(512)
    assert scaled.calibrate(dataset) == pytest.approx(expected, rel=1e-6)
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    weighted = tf.data.Dataset.from_tensor_slices(
        (logits, one_hot, np.ones(4000, np.float32))
    ).batch(512)
    assert scaled.calibrate(weighted) == pytest.approx(expected, rel=1e-6)


def test_bad_arguments():
    logits, labels = calibrated_logits(num_samples=100)
    logits = logits.astype(np.float32)
    with pytest.raises(ValueError, match="model"):
        TemperatureScaling("not a model")
    with pytest.raises(ValueError, match="from_logits"):
        TemperatureScaling(identity_model(), from_logits=1)
    scaled = TemperatureScaling(identity_model())
    with pytest.raises(ValueError, match="method='adam'"):
        scaled.calibrate(logits, labels, method="adam")
    with pytest.raises(ValueError, match="grid"):
        scaled.calibrate(logits, labels, grid=[1.0, 2.0])
    for grid in ([], [1.0, -2.0], [1.0, float("nan")], ["a"]):
        with pytest.raises(ValueError, match="grid"):
            scaled.calibrate(logits, labels, method="ece_grid", grid=grid)
    with pytest.raises(ValueError, match=r"y.shape=\(99,\)"):
        scaled.calibrate(logits, labels[:99])
    with pytest.raises(ValueError, match="class ids in"):
        scaled.calibrate(logits, labels + NUM_CLASSES)
    with pytest.raises(ValueError, match="sample_weight"):
        scaled.calibrate(logits, labels, sample_weight=-np.ones(100))
    with pytest.raises(ValueError, match="yield"):
        scaled.calibrate(iter([logits, logits]))
    for value in (0.0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="temperature"):
            scaled.temperature = value
