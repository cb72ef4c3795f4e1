"""Speed of the post-hoc calibrators' fits.

On 10^5 x 100 logits (over-confident, with a per-class skew), each fit at
fixed penalties: temperature scaling (against the former numpy fit, kept in
`tests/test_temperature_scaling.py` as the reference, timed alternately in
the same process), vector scaling, matrix scaling (no penalty) and Dirichlet
calibration (ODIR penalties 1e-2, 1e-2); then the cross-validated choice of
the Dirichlet penalties over Kull et al.'s full grid, on a smaller set. Each
Keras backend runs in its own process. The table replaces the block between
`<!-- perf_calibration:start -->` and `<!-- perf_calibration:end -->` in
`docs/performance.md` (appended if absent); the rest of the file is kept.

Usage:
    python -m benchmarks.perf_calibration [--backends tensorflow,jax,torch]
        [--repeats 3] [--cv-shape 5000x10] [--no-cv] [--quick] [--no-write]
        [--cv-only]

`--quick` is `--repeats 1 --no-cv`, to check a change; `--no-cv` skips the
cross-validation. `--cv-only` times only the cross-validation (at
`--cv-shape`, for instance `100000x100`) and prints its table without
writing it.
"""

import argparse
import importlib.util
import os
import pathlib
import statistics
import time

from benchmarks.perf_report import emit_result
from benchmarks.perf_report import machine_description
from benchmarks.perf_report import replace_block
from benchmarks.perf_report import run_worker

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BACKENDS = ("tensorflow", "jax", "torch")
SHAPE = (10**5, 100)
PENALTIES = (1e-2, 1e-2)


def _load_numpy_reference():
    path = ROOT / "tests" / "test_temperature_scaling.py"
    spec = importlib.util.spec_from_file_location("temperature_tests", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(path.parent))  # for its `import ece_reference`
    spec.loader.exec_module(module)
    return module.numpy_temperature_fit


def miscalibrated_logits(num_samples, num_classes, seed=0):
    """Labels drawn from softmax(z), returned with logits 1.5 * z scaled by a
    per-class factor from 0.7 to 1.3: over-confident and skewed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    calibrated = 2.0 * rng.standard_normal((num_samples, num_classes))
    probs = np.exp(calibrated - calibrated.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    labels = (probs.cumsum(axis=-1) > rng.random(num_samples)[:, None]).argmax(-1)
    skew = 1.5 * np.linspace(0.7, 1.3, num_classes)
    return (calibrated * skew).astype(np.float32), labels


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _fit_rows(repeats):
    import keras

    from keras_label_relax import calibration

    numpy_fit = _load_numpy_reference()
    logits, labels = miscalibrated_logits(*SHAPE)
    log_probs = calibration._log_softmax(logits.astype("float64"))
    cases = {
        "temperature": lambda: calibration.fit_temperature_nll(logits, labels),
        "temperature, former numpy fit": lambda: numpy_fit(logits, labels),
        "vector": lambda: calibration.fit_vector_scaling(logits, labels),
        "matrix (no penalty)": lambda: calibration.fit_matrix_scaling(logits, labels),
        "Dirichlet (ODIR 1e-2, 1e-2)": lambda: calibration.fit_matrix_scaling(
            log_probs, labels, *PENALTIES
        ),
    }
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up: compilation
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn)[0])
    ratios = [
        new / old
        for new, old in zip(
            times["temperature"], times["temperature, former numpy fit"], strict=True
        )
    ]
    rows = [
        {
            "backend": keras.backend.backend(),
            "case": name,
            "median_s": statistics.median(values),
            "min_s": min(values),
        }
        for name, values in times.items()
    ]
    return rows, statistics.median(ratios)


def _cv_row(shape):
    import keras

    from keras_label_relax import calibration

    logits, labels = miscalibrated_logits(*shape, seed=1)
    log_probs = calibration._log_softmax(logits.astype("float64"))
    grid = calibration.odir_grid(shape[1])
    seconds, chosen = _timed(
        lambda: calibration.choose_odir_penalties(log_probs, labels, grid, folds=5)
    )
    return {
        "backend": keras.backend.backend(),
        "seconds": seconds,
        "fits": len(grid[0]) * len(grid[1]) * 5,
        "chosen": chosen,
    }


def _worker(repeats, cv_shape, cv_only):
    load = os.getloadavg()[0]
    rows, ratio = ([], None) if cv_only else _fit_rows(repeats)
    cv = _cv_row(cv_shape) if cv_shape else None
    load = (load, os.getloadavg()[0])
    emit_result({"fits": rows, "ratio": ratio, "cv": cv, "load": load})


def _versions():
    import keras

    return f"Keras {keras.__version__}"


def _table(results, repeats, cv_shape):
    lines = [
        "### Post-hoc calibrators",
        "",
        f"Machine: {machine_description()}; {_versions()}. The load "
        "average says whether other work shared the machine (the benchmark "
        "itself keeps about 2 cores busy); the ratio column compares fits timed "
        "alternately in the same process. "
        f"{SHAPE[0]:,} x {SHAPE[1]} float32 logits (calibrated logits "
        "2 N(0, 1) times 1.5 times a per-class factor from 0.7 to 1.3), one "
        "fit from the cached logits, without running a model. Seconds, median "
        f"(min) of {repeats} runs after a warm-up that compiles; *load* is "
        "the 1-minute load average before and after the backend's runs. "
        "Tolerances: temperature to 1e-8 relative in T (a Newton step, or the "
        "next one as the last two steps' quadratic convergence predicts it), "
        "or until the step is below float32's rounding of 1 / T; vector "
        "scaling until the "
        "Newton decrement is below 1e-8; matrix and Dirichlet until L-BFGS "
        "lowers the objective by less than 1e-7 (relative) or the largest "
        "gradient entry is below 1e-6.",
        "",
        "| backend | load | fit | seconds |",
        "|---|---|---|---|",
    ]
    for backend, result in results.items():
        load = "{:.1f}-{:.1f}".format(*result["load"])
        for row in result["fits"]:
            lines.append(
                f"| {backend} | {load} | {row['case']} | {row['median_s']:.2f} "
                f"({row['min_s']:.2f}) |"
            )
    lines += [
        "",
        "Temperature fit over the former numpy fit, median of the per-run "
        "ratios: "
        + ", ".join(
            f"{backend} {result['ratio']:.2f}x" for backend, result in results.items()
        )
        + ".",
    ]
    options = f"--repeats {repeats}"
    if cv_shape:
        lines += _cv_lines(results, cv_shape)
        options += f" --cv-shape {cv_shape[0]}x{cv_shape[1]}"
    else:
        options += " --no-cv"
    lines += [
        "",
        f"Reproduce with `python -m benchmarks.perf_calibration {options}`.",
    ]
    return "\n".join(lines)


def _cv_lines(results, cv_shape):
    fits = results[next(iter(results))]["cv"]["fits"]
    lines = [
        "",
        "Cross-validated Dirichlet penalties (`calibrate(..., "
        f'off_diagonal_l2="cv")`): {cv_shape[0]:,} x {cv_shape[1]} '
        "log-probabilities, 5 folds over Kull et al.'s full grid "
        f"({fits} fits, each started from the previous one's solution and L-BFGS "
        "curvature along the off-diagonal penalties), one "
        "run:",
        "",
        "| backend | seconds | chosen (off-diagonal, bias) |",
        "|---|---|---|",
    ]
    for backend, result in results.items():
        cv = result["cv"]
        lines.append(
            f"| {backend} | {cv['seconds']:.1f} | {cv['chosen'][0]:g}, "
            f"{cv['chosen'][1]:g} |"
        )
    return lines


def _shape(text):
    rows, classes = text.lower().split("x")
    return int(rows), int(classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cv-shape", type=_shape, default=(5000, 10))
    parser.add_argument("--no-cv", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--cv-only", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    cv_shape = None if args.no_cv or args.quick else args.cv_shape
    if args.cv_only and not cv_shape:
        parser.error("--cv-only times the cross-validation: drop --no-cv/--quick")
    if args.worker:
        _worker(args.repeats, cv_shape, args.cv_only)
        return
    results = {}
    for backend in args.backends.split(","):
        print(f"running {backend} ...", flush=True)
        options = ["--repeats", args.repeats]
        if cv_shape:
            options += ["--cv-shape", f"{cv_shape[0]}x{cv_shape[1]}"]
        else:
            options += ["--no-cv"]
        if args.cv_only:
            options += ["--cv-only"]
        results[backend] = run_worker("benchmarks.perf_calibration", backend, *options)
    if args.cv_only:
        print("\n".join(_cv_lines(results, cv_shape)))
        return
    text = _table(results, args.repeats, cv_shape)
    print(text)
    if not args.no_write:
        replace_block(DOC, "perf_calibration", text)


if __name__ == "__main__":
    main()
