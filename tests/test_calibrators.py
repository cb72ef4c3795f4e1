"""Vector scaling, matrix scaling and Dirichlet calibration: fits against
float64 scipy references, held-out NLL, gradients, saving and bad input.

The authors' `dirichletcal` package is no reference here: its only release on
PyPI, 0.3.dev4 (a source archive), fails to build because its setup.py joins
its requirements into one string ("numpy>=1.14.2scipy>=1.0.0..."), which
setuptools rejects. The Dirichlet/ODIR fits are checked against an
independent float64 scipy minimisation of the same penalised objective.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_label_relax import DirichletCalibration
from keras_label_relax import MatrixScaling
from keras_label_relax import TemperatureScaling
from keras_label_relax import VectorScaling
from keras_label_relax.calibration import _MatrixProblem
from keras_label_relax.calibration import _VectorProblem
from keras_label_relax.calibration import choose_odir_penalties
from keras_label_relax.calibration import compare_calibrators
from keras_label_relax.calibration import fit_matrix_scaling
from keras_label_relax.calibration import fit_vector_scaling
from keras_label_relax.calibration import odir_grid

scipy_optimize = pytest.importorskip("scipy.optimize")

CALIBRATORS = (TemperatureScaling, VectorScaling, MatrixScaling, DirichletCalibration)


# Float64 references, written independently of the package.


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_nll(logits, labels):
    return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def sample_labels(logits, rng):
    probs = np.exp(log_softmax(logits))
    return (probs.cumsum(axis=-1) > rng.random(len(probs))[:, None]).argmax(axis=-1)


def odir_objective(matrix, bias, scores, labels, off_diagonal_l2, bias_l2):
    """Mean NLL of softmax(scores W^T + b) plus the normalised ODIR penalty."""
    k = len(bias)
    off_diagonal = matrix[~np.eye(k, dtype=bool)]
    penalty = off_diagonal_l2 / (k * (k - 1)) * np.sum(off_diagonal**2)
    penalty += bias_l2 / k * np.sum(bias**2)
    return mean_nll(scores @ matrix.T + bias, labels) + penalty


def scipy_matrix_fit(scores, labels, off_diagonal_l2, bias_l2):
    """Exact float64 minimiser of `odir_objective` (analytic gradient)."""
    k = scores.shape[1]
    onehot = np.eye(k)[labels]
    mask = 1.0 - np.eye(k)

    def objective(theta):
        matrix, bias = theta[: k * k].reshape(k, k), theta[k * k :]
        logits = scores @ matrix.T + bias
        value = odir_objective(matrix, bias, scores, labels, off_diagonal_l2, bias_l2)
        residual = (np.exp(log_softmax(logits)) - onehot) / len(labels)
        grad_matrix = residual.T @ scores
        grad_matrix += 2 * off_diagonal_l2 / (k * (k - 1)) * mask * matrix
        grad_bias = residual.sum(axis=0) + 2 * bias_l2 / k * bias
        return value, np.concatenate([grad_matrix.ravel(), grad_bias])

    start = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
    found = scipy_optimize.minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 20000, "maxcor": 30},
    )
    return found.x[: k * k].reshape(k, k), found.x[k * k :]


def odir_hessian(matrix, bias, scores, labels, off_diagonal_l2, bias_l2):
    """Hessian of `odir_objective` w.r.t. the rows of `[W b]`, flattened."""
    n, k = scores.shape
    features = np.concatenate([scores, np.ones((n, 1))], axis=1)
    probs = np.exp(log_softmax(features @ np.concatenate([matrix, bias[:, None]], 1).T))
    hessian = np.zeros((k * (k + 1), k * (k + 1)))
    for i in range(k):
        for j in range(k):
            weight = probs[:, i] * ((i == j) - probs[:, j]) / n
            block = (features * weight[:, None]).T @ features
            hessian[
                i * (k + 1) : (i + 1) * (k + 1), j * (k + 1) : (j + 1) * (k + 1)
            ] = block
    coefficients = np.full((k, k + 1), off_diagonal_l2 / (k * (k - 1)))
    coefficients[np.diag_indices(k)] = 0.0
    coefficients[:, k] = bias_l2 / k
    return hessian + np.diag(2 * coefficients.ravel())


def exact_newton_matrix_fit(scores, labels, off_diagonal_l2, bias_l2):
    """Float64 minimiser of `odir_objective` by scipy's exact-Hessian trust
    region, which also converges where L-BFGS crawls (nearly separable
    data)."""
    k = scores.shape[1]
    onehot = np.eye(k)[labels]
    features = np.concatenate([scores, np.ones((len(labels), 1))], axis=1)
    args = (scores, labels, off_diagonal_l2, bias_l2)

    def split(theta):
        affine = theta.reshape(k, k + 1)
        return affine[:, :k], affine[:, k]

    def objective(theta):
        matrix, bias = split(theta)
        residual = np.exp(log_softmax(features @ theta.reshape(k, k + 1).T)) - onehot
        penalty = odir_hessian(matrix, bias, scores[:0], labels[:0], *args[2:])
        gradient = (residual.T @ features / len(labels)).ravel() + penalty @ theta
        return odir_objective(matrix, bias, *args), gradient

    found = scipy_optimize.minimize(
        objective,
        np.concatenate([np.eye(k), np.zeros((k, 1))], axis=1).ravel(),
        jac=True,
        hess=lambda theta: odir_hessian(*split(theta), *args),
        method="trust-exact",
        options={"gtol": 1e-10},
    )
    return split(found.x)


def scipy_vector_fit(logits, labels):
    k = logits.shape[1]
    onehot = np.eye(k)[labels]

    def objective(theta):
        scale, bias = theta[:k], theta[k:]
        log_probs = log_softmax(logits * scale + bias)
        value = -np.mean(np.sum(onehot * log_probs, axis=-1))
        residual = (np.exp(log_probs) - onehot) / len(labels)
        gradient = np.concatenate([(residual * logits).sum(0), residual.sum(0)])
        return value, gradient

    found = scipy_optimize.minimize(
        objective,
        np.concatenate([np.ones(k), np.zeros(k)]),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 20000},
    )
    scale, bias = found.x[:k], found.x[k:]
    return scale, bias - bias.mean()


# Data and models.


def miscalibrated(num_samples, num_classes, seed):
    """Logits whose calibrated version mixes classes and shifts them.

    The labels follow softmax(M z + c) with a non-diagonal M, so the logits
    `z` are over-confident and off in ways no single temperature fixes.
    """
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((num_samples, num_classes))
    mixing = 0.5 * np.eye(num_classes) + 0.1 * rng.standard_normal(
        (num_classes, num_classes)
    )
    shift = 0.5 * rng.standard_normal(num_classes)
    labels = sample_labels(logits @ mixing.T + shift, rng)
    return logits.astype(np.float32), labels


def identity_model(num_classes):
    return keras.Sequential([keras.Input((num_classes,)), keras.layers.Identity()])


def softmax_model(num_classes):
    return keras.Sequential(
        [keras.Input((num_classes,)), keras.layers.Activation("softmax")]
    )


def make(cls, num_classes, **kwargs):
    return cls(identity_model(num_classes), **kwargs)


# Values.


def test_vector_scaling_recovers_a_known_per_class_scaling():
    rng = np.random.default_rng(0)
    num_samples, num_classes = 100_000, 4
    scale = np.array([0.5, 0.8, 1.2, 2.0])
    bias = np.array([0.3, -0.2, 0.1, -0.2])
    logits = 2.0 * rng.standard_normal((num_samples, num_classes))
    labels = sample_labels(logits * scale + bias, rng)
    scaled = make(VectorScaling, num_classes)
    fitted = scaled.calibrate(logits.astype(np.float32), labels, batch_size=50_000)
    np.testing.assert_allclose(fitted["scale"], scale, atol=2e-2)
    np.testing.assert_allclose(fitted["bias"], bias - bias.mean(), atol=2e-2)
    exact_scale, exact_bias = scipy_vector_fit(
        logits.astype(np.float32).astype(np.float64), labels
    )
    np.testing.assert_allclose(fitted["scale"], exact_scale, atol=2e-3)
    np.testing.assert_allclose(fitted["bias"], exact_bias, atol=2e-3)
    np.testing.assert_allclose(ops.convert_to_numpy(scaled.scale), scale, atol=2e-2)


def test_vector_scaling_matches_the_exact_fit_closely_on_small_data():
    logits, labels = miscalibrated(3000, 5, seed=1)
    scale, bias = fit_vector_scaling(logits, labels)
    exact_scale, exact_bias = scipy_vector_fit(logits.astype(np.float64), labels)
    np.testing.assert_allclose(scale, exact_scale, atol=1e-4)
    np.testing.assert_allclose(bias, exact_bias, atol=1e-4)


@pytest.mark.parametrize(
    "off_diagonal_l2, bias_l2", [(0.0, 0.0), (1e-2, 1e-2), (1.0, 0.1), (30.0, 3.0)]
)
def test_dirichlet_fit_matches_an_exact_scipy_fit(off_diagonal_l2, bias_l2):
    logits, labels = miscalibrated(2000, 4, seed=2)
    scaled = make(
        DirichletCalibration,
        4,
        off_diagonal_l2=off_diagonal_l2,
        bias_l2=bias_l2,
    )
    fitted = scaled.calibrate(logits, labels)
    scores = log_softmax(logits.astype(np.float64))
    exact = scipy_matrix_fit(scores, labels, off_diagonal_l2, bias_l2)
    args = (scores, labels, off_diagonal_l2, bias_l2)
    ours = odir_objective(fitted["matrix"], fitted["bias"], *args)
    best = odir_objective(*exact, *args)
    assert ours == pytest.approx(best, abs=1e-6)
    assert mean_nll(scores @ fitted["matrix"].T + fitted["bias"], labels) == (
        pytest.approx(mean_nll(scores @ exact[0].T + exact[1], labels), abs=1e-4)
    )
    if off_diagonal_l2 >= 1:
        # Weaker penalties leave directions too flat to pin the parameters.
        np.testing.assert_allclose(fitted["matrix"], exact[0], atol=2e-3)
        np.testing.assert_allclose(fitted["bias"], exact[1], atol=2e-3)


def test_matrix_scaling_matches_an_exact_scipy_fit():
    logits, labels = miscalibrated(2000, 5, seed=3)
    matrix, bias = fit_matrix_scaling(logits, labels, 0.5, 0.05)
    exact = scipy_matrix_fit(logits.astype(np.float64), labels, 0.5, 0.05)
    args = (logits.astype(np.float64), labels, 0.5, 0.05)
    assert odir_objective(matrix, bias, *args) == pytest.approx(
        odir_objective(*exact, *args), abs=1e-6
    )
    np.testing.assert_allclose(matrix, exact[0], atol=2e-3)


def test_small_matrix_fits_converge_where_the_model_nearly_separates():
    # 300 predictions of 8 classes, 2% wrong: the NLL keeps falling as the
    # diagonal grows, a flat valley in which L-BFGS stopped 6e-6 short of
    # the minimum after thousands of steps; Newton (up to 10 classes) gets
    # within 1e-9.
    rng = np.random.default_rng(21)
    labels = rng.integers(0, 8, 300)
    logits = rng.standard_normal((300, 8)) + 5.0 * np.eye(8)[labels]
    wrong = rng.random(300) < 0.02
    labels[wrong] = (labels[wrong] + 1) % 8
    scores = log_softmax(logits)
    scaled = make(DirichletCalibration, 8)
    fitted = scaled.calibrate(logits.astype(np.float32), labels)
    args = (scores, labels, 1e-2, 1e-2)
    ours = odir_objective(fitted["matrix"], fitted["bias"], *args)
    best = odir_objective(*exact_newton_matrix_fit(*args), *args)
    assert best <= ours <= best + 1e-6


def test_heldout_nll_is_at_most_the_uncalibrated_nll():
    logits, labels = miscalibrated(12_000, 6, seed=4)
    calibration = logits[:6000], labels[:6000]
    test_logits, test_labels = logits[6000:], labels[6000:]
    uncalibrated = mean_nll(test_logits, test_labels)
    for cls in CALIBRATORS:
        scaled = make(cls, 6)
        scaled.calibrate(*calibration)
        probs = ops.convert_to_numpy(scaled(test_logits)).astype(np.float64)
        calibrated = float(-np.mean(np.log(probs[np.arange(6000), test_labels])))
        assert calibrated < uncalibrated - 0.05, cls.__name__


def exact_temperature(logits, labels):
    """The float64 root of the NLL's derivative in the inverse temperature."""
    z = np.asarray(logits, dtype=np.float64)
    label_logit = z[np.arange(len(labels)), labels]

    def slope(s):
        probs = np.exp(log_softmax(s * z))
        return float(np.mean(np.sum(probs * z, axis=-1) - label_logit))

    return 1.0 / scipy_optimize.brentq(slope, 1e-2, 1e2, xtol=1e-15, rtol=1e-15)


def test_temperature_nll_is_never_below_the_exact_one_parameter_optimum():
    for seed in range(3):
        logits, labels = miscalibrated(3000, 5, seed=10 + seed)
        scaled = make(TemperatureScaling, 5)
        temperature = scaled.calibrate(logits, labels)
        exact = exact_temperature(logits, labels)
        assert temperature == pytest.approx(exact, rel=1e-6)
        z = logits.astype(np.float64)
        optimum, fitted = mean_nll(z / exact, labels), mean_nll(z / temperature, labels)
        assert optimum - 1e-14 <= fitted <= optimum + 1e-12


def test_probability_models_use_log_probabilities_as_scores():
    logits, labels = miscalibrated(3000, 4, seed=5)
    log_probs = log_softmax(logits).astype(np.float32)
    for cls in (VectorScaling, MatrixScaling, DirichletCalibration):
        from_probs = cls(softmax_model(4), from_logits=False)
        # Dirichlet calibration always works on log-probabilities.
        inputs = logits if cls is DirichletCalibration else log_probs
        from_scores = make(cls, 4)
        a, b = (
            from_probs.calibrate(logits, labels),
            from_scores.calibrate(inputs, labels),
        )
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=2e-3)
        np.testing.assert_allclose(
            ops.convert_to_numpy(from_probs(logits[:16])),
            ops.convert_to_numpy(from_scores(inputs[:16])),
            atol=1e-4,
        )


def test_dirichlet_outputs_are_the_affine_map_of_log_probabilities():
    logits, _ = miscalibrated(32, 3, seed=6)
    scaled = make(DirichletCalibration, 3)
    matrix = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, -0.2], [0.3, 0.0, 1.1]])
    bias = np.array([0.1, -0.3, 0.2])
    scaled.matrix.assign(matrix)
    scaled.bias.assign(bias)
    expected = np.exp(log_softmax(log_softmax(logits) @ matrix.T + bias))
    np.testing.assert_allclose(
        ops.convert_to_numpy(scaled(logits)), expected, atol=1e-5
    )


def test_sample_weights_equal_repeated_samples():
    logits, labels = miscalibrated(1500, 4, seed=7)
    counts = np.random.default_rng(8).integers(0, 3, len(labels))
    repeated = (np.repeat(logits, counts, axis=0), np.repeat(labels, counts))
    for cls in (VectorScaling, DirichletCalibration):
        weighted = make(cls, 4)
        weighted.calibrate(logits, labels, sample_weight=counts)
        plain = make(cls, 4)
        plain.calibrate(*repeated)
        np.testing.assert_allclose(
            ops.convert_to_numpy(weighted(logits)),
            ops.convert_to_numpy(plain(logits)),
            atol=1e-3,
        )


# Derivatives.


def reference_vector_objective(theta, logits, labels):
    k = logits.shape[1]
    return mean_nll(logits * theta[:k] + theta[k:], labels)


def test_vector_gradient_and_hessian_match_finite_differences():
    logits, labels = miscalibrated(500, 4, seed=9)
    problem = _VectorProblem(logits, labels, None)
    theta = np.array([0.7, 1.1, 0.9, 1.3, 0.2, -0.1, 0.0, 0.3])
    value, gradient, hessian = problem.objective(theta, with_hessian=True)
    z = logits.astype(np.float64)
    assert value == pytest.approx(reference_vector_objective(theta, z, labels), 1e-6)
    step = 1e-5
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = step
        numeric = (
            reference_vector_objective(theta + e, z, labels)
            - reference_vector_objective(theta - e, z, labels)
        ) / (2 * step)
        assert gradient[i] == pytest.approx(numeric, abs=1e-5)
        numeric_row = (
            problem.objective(theta + 100 * e)[1]
            - problem.objective(theta - 100 * e)[1]
        ) / (200 * step)
        np.testing.assert_allclose(hessian[i], numeric_row, atol=2e-3)
    value_only, gradient_only, no_hessian = problem.objective(theta, False)
    assert no_hessian is None
    assert value_only == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(gradient_only, gradient, rtol=1e-6, atol=1e-9)


def perturbed_matrix_problem(seed):
    """A 500 x 4 Dirichlet problem and a point near the identity map: its
    `[W b]` and its whitened coordinates `V = [W b] L`, the optimiser's."""
    logits, labels = miscalibrated(500, 4, seed=seed)
    scores = log_softmax(logits)
    problem = _MatrixProblem(scores, labels, None)
    rng = np.random.default_rng(seed + 1)
    affine = np.concatenate([np.eye(4), np.zeros((4, 1))], axis=1)
    affine += 0.3 * rng.standard_normal(affine.shape)
    return scores, labels, problem, affine, affine @ problem.factor, rng


@pytest.mark.parametrize("off_diagonal_l2, bias_l2", [(0.0, 0.0), (2.0, 0.5)])
def test_penalised_matrix_gradient_matches_finite_differences(off_diagonal_l2, bias_l2):
    scores, labels, problem, _, whitened, rng = perturbed_matrix_problem(11)
    value, gradient = problem.objective(whitened.ravel(), off_diagonal_l2, bias_l2)

    def reference(v):
        a = v.reshape(4, 5) @ problem.inverse_factor
        return odir_objective(
            a[:, :4], a[:, 4], scores, labels, off_diagonal_l2, bias_l2
        )

    assert value == pytest.approx(reference(whitened.ravel()), abs=1e-6)
    for _ in range(6):
        direction = rng.standard_normal(whitened.size)
        step = 1e-5
        numeric = (
            reference(whitened.ravel() + step * direction)
            - reference(whitened.ravel() - step * direction)
        ) / (2 * step)
        assert gradient @ direction == pytest.approx(numeric, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("off_diagonal_l2, bias_l2", [(0.0, 0.0), (2.0, 0.5)])
def test_penalised_matrix_hessian_is_the_exact_one(off_diagonal_l2, bias_l2):
    scores, labels, problem, affine, whitened, _ = perturbed_matrix_problem(13)
    *_, hessian = problem.newton_objective(
        whitened.ravel(), True, off_diagonal_l2, bias_l2
    )
    # V = [W b] L, so the Hessian w.r.t. V is the one w.r.t. [W b] seen
    # through L^-1 on each row.
    exact = odir_hessian(
        affine[:, :4], affine[:, 4], scores, labels, off_diagonal_l2, bias_l2
    )
    rows = np.kron(np.eye(4), problem.inverse_factor)
    np.testing.assert_allclose(hessian, rows @ exact @ rows.T, rtol=1e-4, atol=1e-7)


# Cross-validation.


def brute_force_cv(scores, labels, grid, folds, seed):
    from keras_label_relax.calibration import _stratified_folds

    fold_of = _stratified_folds(labels, folds, seed)
    best = None
    for off_diagonal_l2 in grid[0]:
        for bias_l2 in grid[1]:
            total = 0.0
            for fold in range(folds):
                train, test = fold_of != fold, fold_of == fold
                matrix, bias = scipy_matrix_fit(
                    scores[train], labels[train], off_diagonal_l2, bias_l2
                )
                logits = scores[test] @ matrix.T + bias
                total += mean_nll(logits, labels[test]) * test.sum()
            if best is None or total < best[0]:
                best = (total, off_diagonal_l2, bias_l2)
    return best[1:]


def test_cv_picks_the_grid_pair_with_the_lowest_heldout_nll():
    logits, labels = miscalibrated(300, 3, seed=13)
    scores = log_softmax(logits)
    grid = ((1e-3, 100.0), (1e-3, 10.0))
    chosen = choose_odir_penalties(scores, labels, grid, folds=3, seed=0)
    assert chosen == brute_force_cv(scores, labels, grid, 3, 0)


def test_cv_prefers_strong_penalties_when_the_model_is_calibrated():
    rng = np.random.default_rng(14)
    logits = 2.0 * rng.standard_normal((400, 4))
    labels = sample_labels(logits, rng)
    scaled = make(DirichletCalibration, 4)
    grid = ((1e-4, 1.0, 1e2), (1e-4, 1e2))
    fitted = scaled.calibrate(
        logits.astype(np.float32), labels, off_diagonal_l2="cv", grid=grid, folds=3
    )
    assert fitted["off_diagonal_l2"] >= 1.0
    assert scaled.off_diagonal_l2 == fitted["off_diagonal_l2"]
    assert scaled.bias_l2 == fitted["bias_l2"]


def test_odir_grid_is_kull_et_al():
    off_diagonal, bias = odir_grid(10)
    assert len(off_diagonal) == 36 and len(bias) == 12
    assert min(off_diagonal) == pytest.approx(0.25e-5)
    assert max(off_diagonal) == 1e6 and bias[0] == 1e-5
    assert odir_grid(100)[1][0] == 1e-2


def test_compare_calibrators_scores_each_fit_on_the_test_logits():
    logits, labels = miscalibrated(3000, 4, seed=19)
    rows = compare_calibrators(
        logits[:1500],
        labels[:1500],
        logits[1500:],
        labels[1500:],
        grid=((1e-2, 1.0), (1e-2,)),
    )
    assert [row["name"] for row in rows] == [
        "uncalibrated",
        "temperature scaling",
        "vector scaling",
        "matrix scaling (ODIR 1e-2)",
        "Dirichlet (ODIR, cv)",
    ]
    z, y = logits[1500:].astype(np.float64), labels[1500:]
    probs = np.exp(log_softmax(z))
    assert rows[0]["nll"] == pytest.approx(mean_nll(z, y), rel=1e-9)
    brier = np.mean(np.sum((probs - np.eye(4)[y]) ** 2, axis=-1))
    assert rows[0]["brier"] == pytest.approx(brier, rel=1e-9)
    assert rows[0]["accuracy"] == np.mean(z.argmax(-1) == y)
    temperature = rows[1]["parameters"]
    assert rows[1]["nll"] == pytest.approx(mean_nll(z / temperature, y), abs=1e-6)
    for row in rows[1:]:
        assert row["nll"] < rows[0]["nll"] and row["ece"] < rows[0]["ece"]
    assert rows[-1]["parameters"]["off_diagonal_l2"] in (1e-2, 1.0)


# Saving, datasets, freezing.


@pytest.mark.parametrize("cls", CALIBRATORS[1:], ids=lambda cls: cls.__name__)
def test_save_and_load_keep_parameters_and_outputs(cls, tmp_path):
    logits, labels = miscalibrated(800, 4, seed=15)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    kwargs = {} if cls is VectorScaling else {"off_diagonal_l2": 0.3, "bias_l2": 0.2}
    scaled = cls(base, name="calibrated", **kwargs)
    scaled.calibrate(logits, labels)
    expected = ops.convert_to_numpy(scaled(logits[:16]))
    path = tmp_path / "calibrated.keras"
    scaled.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is cls and restored.name == "calibrated"
    np.testing.assert_allclose(ops.convert_to_numpy(restored(logits[:16])), expected)
    assert restored.get_config() == scaled.get_config() | {
        "model": restored.get_config()["model"]
    }
    assert [w.name for w in restored.trainable_weights] == [
        w.name for w in scaled.trainable_weights
    ]


def test_wrapped_model_is_frozen_and_only_calibration_weights_train():
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    assert [w.name for w in VectorScaling(base).trainable_weights] == ["scale", "bias"]
    assert [w.name for w in MatrixScaling(base).trainable_weights] == [
        "matrix",
        "bias",
    ]
    assert len(DirichletCalibration(base).non_trainable_weights) == 2


def test_datasets_give_the_array_fit():
    tf = pytest.importorskip("tensorflow")
    logits, labels = miscalibrated(2000, 4, seed=16)
    scaled = make(DirichletCalibration, 4)
    expected = scaled.calibrate(logits, labels)
    dataset = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(300)
    got = scaled.calibrate(dataset)
    np.testing.assert_allclose(got["matrix"], expected["matrix"], atol=1e-5)
    batches = [(logits[i : i + 500], labels[i : i + 500]) for i in range(0, 2000, 500)]
    got = make(VectorScaling, 4).calibrate(iter(batches))
    want = make(VectorScaling, 4).calibrate(logits, labels)
    np.testing.assert_allclose(got["scale"], want["scale"], atol=1e-5)


# Bad input.


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"off_diagonal_l2=-1"):
        make(DirichletCalibration, 3, off_diagonal_l2=-1)
    with pytest.raises(ValueError, match=r"bias_l2=nan"):
        make(MatrixScaling, 3, bias_l2=float("nan"))
    with pytest.raises(ValueError, match="model"):
        VectorScaling("not a model")
    with pytest.raises(ValueError, match="from_logits"):
        make(VectorScaling, 3, from_logits="yes")
    one_class = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"model.*\(None, 1\)"):
        VectorScaling(one_class)
    flat = keras.Sequential(
        [keras.Input((3,)), keras.layers.Lambda(lambda x: ops.sum(x, axis=-1))]
    )
    with pytest.raises(ValueError, match="model"):
        DirichletCalibration(flat)


def test_bad_calibrate_arguments():
    logits, labels = miscalibrated(100, 3, seed=17)
    scaled = make(DirichletCalibration, 3)
    with pytest.raises(ValueError, match=r"off_diagonal_l2=-1"):
        scaled.calibrate(logits, labels, off_diagonal_l2=-1)
    with pytest.raises(ValueError, match=r"off_diagonal_l2='grid'"):
        scaled.calibrate(logits, labels, off_diagonal_l2="grid")
    with pytest.raises(ValueError, match=r"bias_l2=0.1"):
        scaled.calibrate(logits, labels, off_diagonal_l2="cv", bias_l2=0.1)
    with pytest.raises(ValueError, match=r"folds=1"):
        scaled.calibrate(logits, labels, off_diagonal_l2="cv", folds=1)
    with pytest.raises(ValueError, match="grid"):
        scaled.calibrate(logits, labels, off_diagonal_l2="cv", grid=([1.0],))
    with pytest.raises(ValueError, match="grid"):
        scaled.calibrate(logits, labels, off_diagonal_l2="cv", grid=([1.0], [-1.0]))
    with pytest.raises(ValueError, match="grid"):
        scaled.calibrate(logits, labels, grid=([1.0], [1.0]))


@pytest.mark.parametrize("cls", CALIBRATORS, ids=lambda cls: cls.__name__)
def test_bad_data(cls):
    logits, labels = miscalibrated(100, 3, seed=18)
    scaled = make(cls, 3)
    with pytest.raises(ValueError, match=r"`y`.*\[0, 3\).*\[1, 5\]"):
        scaled.calibrate(logits, np.where(labels == 0, 5, labels))
    with pytest.raises(ValueError, match=r"`y`.*\[-1, 1\]"):
        scaled.calibrate(logits, labels - 1)
    with pytest.raises(ValueError, match="`x` yielded no batches"):
        scaled.calibrate(iter([]))
    with pytest.raises(ValueError, match=r"`x`.*0 examples"):
        scaled.calibrate(logits[:0], labels[:0])
    for bad in (np.nan, np.inf):
        broken = logits.copy()
        broken[7, 1] = bad
        with pytest.raises(ValueError, match=rf"`x`.*finite.*1 non-finite.*{bad}"):
            scaled.calibrate(broken, labels)
    with pytest.raises(ValueError, match="sample_weight"):
        scaled.calibrate(logits, labels, sample_weight=np.zeros(100))


def test_model_output_that_is_not_two_dimensional():
    # The output shape is only known when the model runs.
    class Squeeze(keras.Model):
        def call(self, x):
            return ops.sum(x, axis=-1)

    scaled = TemperatureScaling(Squeeze())
    with pytest.raises(ValueError, match=r"shape \(100,\)"):
        scaled.calibrate(np.ones((100, 3), np.float32), np.zeros(100, int))


def test_small_factorisations_match_numpy():
    from keras_label_relax.calibration import _cholesky
    from keras_label_relax.calibration import _newton_step
    from keras_label_relax.calibration import _solve_lower

    rng = np.random.default_rng(15)
    a = rng.standard_normal((30, 20))
    matrix, vector = a.T @ a, rng.standard_normal(20)
    lower = _cholesky(matrix)
    np.testing.assert_allclose(lower, np.linalg.cholesky(matrix), atol=1e-12)
    np.testing.assert_allclose(
        _solve_lower(lower, np.eye(20)), np.linalg.inv(lower), atol=1e-10
    )
    ridge = 1e-6 * np.max(np.diag(matrix))
    expected = -np.linalg.solve(matrix + ridge * np.eye(20), vector)
    np.testing.assert_allclose(_newton_step(matrix, vector), expected, rtol=1e-9)
    with pytest.raises(np.linalg.LinAlgError):
        _cholesky(-matrix)
    # An indefinite Hessian falls back to least squares.
    indefinite = np.diag([1.0, -1.0])
    np.testing.assert_allclose(
        _newton_step(indefinite, np.array([1.0, 1.0])), [-1.0, 1.0]
    )
