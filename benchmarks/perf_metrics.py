"""Speed and accuracy of the calibration metrics and of temperature fitting.

Every metric's eager `update_state` over N = 10^6 predictions fed as 10
numpy batches (K = 10 and 100 classes, 15 bins, value checks on), and the
compiled ECE update, against torchmetrics' `MulticlassCalibrationError` on
the same batches in the same process, timed alternately (median of
`--repeats` runs), with each one's speed as a ratio to torchmetrics'
(above 1.0: faster); and the fit of
`TemperatureScaling` on 10^5 x 100 logits. Each Keras backend runs in its own
process. The results table replaces the block between
`<!-- perf_metrics:start -->` and `<!-- perf_metrics:end -->` in
`docs/performance.md` (created if absent); the rest of the file is kept.

Usage:
    python -m benchmarks.perf_metrics [--backends tensorflow,jax,torch]
        [--repeats 7] [--no-write]
"""

import argparse
import functools
import importlib.util
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
NUM_SAMPLES = 10**6
NUM_BINS = 15
TS_SHAPE = (10**5, 100)


def _load_reference():
    path = ROOT / "tests" / "ece_reference.py"
    spec = importlib.util.spec_from_file_location("ece_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _compiled_ece(metric):
    """The metric's update + result as one compiled function."""
    import keras

    backend = keras.backend.backend()

    def update_and_result(variables, labels, probs):
        variables = metric.stateless_update_state(variables, labels, probs)
        return metric.stateless_result(variables)

    if backend == "jax":
        import jax

        return jax.jit(update_and_result)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(update_and_result, jit_compile=True)
    import torch

    return torch.compile(update_and_result)


def _ece_rows(reference, repeats):
    rows = []
    for num_classes in (10, 100):
        rows += _ece_case(reference, num_classes, repeats)
    return rows


# The metrics timed eager, streaming `BATCHES` numpy batches.
STREAMED = {
    "ECE": ("ExpectedCalibrationError", {"num_bins": NUM_BINS}),
    "ECE equal-mass": (
        "ExpectedCalibrationError",
        {"num_bins": NUM_BINS, "binning": "equal_mass"},
    ),
    "classwise": ("ClasswiseCalibrationError", {"num_bins": NUM_BINS}),
    "Brier": ("BrierScore", {}),
    "smooth": ("SmoothCalibrationError", {}),
}
BATCHES = 10


def _ece_case(reference, num_classes, repeats):
    import keras
    import numpy as np
    import torch
    from keras import ops
    from torchmetrics.classification import MulticlassCalibrationError

    import keras_label_relax
    from keras_label_relax import ExpectedCalibrationError

    logits, labels = reference.protocol_check_data(NUM_SAMPLES, num_classes)
    probs = reference.softmax(logits).astype(np.float32)
    labels = labels.astype(np.int32)
    expected = {
        "ECE": reference.calibration_error(labels, probs, NUM_BINS),
        "ECE equal-mass": reference.equal_mass_calibration_error(
            labels, probs, NUM_BINS
        ),
        "classwise": reference.classwise_calibration_error(labels, probs, NUM_BINS),
        "Brier": reference.brier_score(labels, probs),
        "smooth": _relplot_smece(labels, probs),
    }
    expected["ECE compiled"] = expected["torchmetrics"] = expected["ECE"]
    batches = [
        (labels[index], probs[index])
        for index in np.array_split(np.arange(NUM_SAMPLES), BATCHES)
    ]
    candidates = {}
    for name, (class_name, arguments) in STREAMED.items():
        metric = getattr(keras_label_relax, class_name)(**arguments)
        candidates[name] = functools.partial(_stream, metric, batches)

    metric = ExpectedCalibrationError(num_bins=NUM_BINS)
    compiled = _compiled_ece(metric)
    variables = [v.value for v in metric.variables]
    labels_k = ops.convert_to_tensor(labels)
    probs_k = ops.convert_to_tensor(probs)
    candidates["ECE compiled"] = lambda: float(compiled(variables, labels_k, probs_k))

    theirs = MulticlassCalibrationError(num_classes=num_classes, n_bins=NUM_BINS)

    def torchmetrics():
        theirs.reset()
        for batch_labels, batch_probs in batches:
            theirs.update(torch.from_numpy(batch_probs), torch.from_numpy(batch_labels))
        return float(theirs.compute())

    candidates["torchmetrics"] = torchmetrics
    rows = _race(candidates, repeats)
    if keras.backend.backend() == "torch":
        # Both sides are PyTorch here: also race them on one thread, which a
        # busy machine's scheduling does not disturb.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        single = _race(candidates, repeats)
        torch.set_num_threads(threads)
        for row in single:
            row["implementation"] += ", 1 thread"
        rows += single
    for row in rows:
        name = row["implementation"].removesuffix(", 1 thread")
        row.update(
            backend=keras.backend.backend(),
            classes=num_classes,
            error=abs(row["value"] - expected[name]),
            reference=expected[name],
        )
    return rows


def _relplot_smece(labels, probs):
    """The authors' smECE (relplot) of the top label, or NaN without it."""
    try:
        import relplot
    except ImportError:
        return float("nan")
    confidence = probs.max(axis=-1).astype("float64")
    correct = (probs.argmax(axis=-1) == labels).astype("float64")
    return float(relplot.smECE(confidence, correct))


def _stream(metric, batches):
    """`update_state` on each numpy batch, eager, then `result()`."""
    metric.reset_state()
    for labels, probs in batches:
        metric.update_state(labels, probs)
    return float(metric.result())


def _race(candidates, repeats):
    """Times the candidates alternately; one row per candidate."""
    times = {name: [] for name in candidates}
    values = {name: fn() for name, fn in candidates.items()}  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            elapsed, values[name] = _timed(fn)
            times[name].append(elapsed)
    return [
        {
            "implementation": name,
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "value": values[name],
        }
        for name in candidates
    ]


def _temperature_rows(repeats):
    import keras
    import numpy as np

    from keras_label_relax import TemperatureScaling
    from keras_label_relax.calibration import fit_temperature_ece_grid
    from keras_label_relax.calibration import fit_temperature_nll

    rng = np.random.default_rng(0)
    num_samples, num_classes = TS_SHAPE
    calibrated = 2.0 * rng.standard_normal(TS_SHAPE)
    probs = np.exp(calibrated - calibrated.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    labels = (probs.cumsum(axis=-1) > rng.random(num_samples)[:, None]).argmax(-1)
    logits = (1.5 * calibrated).astype(np.float32)  # over-confident by 1.5

    model = keras.Sequential([keras.Input((num_classes,)), keras.layers.Identity()])
    scaled = TemperatureScaling(model)
    cases = {
        "fit (NLL)": lambda: fit_temperature_nll(logits, labels),
        "fit (ECE grid, 16 values)": lambda: fit_temperature_ece_grid(logits, labels),
        "calibrate() incl. predict": lambda: scaled.calibrate(
            logits, labels, batch_size=8192
        ),
    }
    rows = []
    for name, fn in cases.items():
        fn()
        runs = [_timed(fn) for _ in range(max(3, repeats // 2))]
        rows.append(
            {
                "backend": keras.backend.backend(),
                "case": name,
                "median_ms": 1e3 * statistics.median(t for t, _ in runs),
                "temperature": runs[-1][1],
            }
        )
    return rows


def _worker(repeats):
    reference = _load_reference()
    result = {
        "ece": _ece_rows(reference, repeats),
        "temperature": _temperature_rows(repeats),
    }
    emit_result(result)


def _versions():
    import keras
    import torch
    import torchmetrics

    return f"Keras {keras.__version__}, torch {torch.__version__}, " + (
        f"torchmetrics {torchmetrics.__version__}"
    )


def _table(results, repeats):
    names = [*STREAMED, "ECE compiled"]
    lines = [
        "### Calibration metrics",
        "",
        f"Machine: {machine_description()}; {_versions()}. The load "
        "average says whether other work shared the machine; each speed-up is "
        "a ratio of medians from one alternating race in one process per "
        f"backend. N = {NUM_SAMPLES:,} float32 probabilities (logits "
        "3 * N(0, 1), uniform labels, seed 0), 15 bins. Eager columns: "
        f"`update_state` on each of {BATCHES} numpy batches of "
        f"{NUM_SAMPLES // BATCHES:,}, value checks on (the default), then "
        "`result()`. *torchmetrics*: `MulticlassCalibrationError` (the "
        "class behind `multiclass_calibration_error`, argument checks on) fed "
        "the same batches through `torch.from_numpy`. *ECE compiled*: one "
        "`stateless_update_state` + `stateless_result` on all N under "
        "`jax.jit` / `tf.function(jit_compile=True)` / `torch.compile`, as "
        "`fit`/`evaluate` run it with `jit_compile=True`. Cells: median ms "
        f"over {repeats} runs and, in brackets, torchmetrics' median over it "
        "(above 1.0x: faster than torchmetrics). *smooth*: "
        "`SmoothCalibrationError` (smECE, which torchmetrics lacks). Errors: the "
        "largest distance of this package's values to float64 numpy references "
        "on the same probabilities (the equal-mass one is the exact sorted "
        "computation; smooth: relplot's `smECE`) / torchmetrics'.",
        "",
        "| backend | K | " + " | ".join(names) + " | torchmetrics | errors |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    for backend, result in results.items():
        groups = {}
        for row in result["ece"]:
            threads = ", 1 thread" if row["implementation"].endswith("thread") else ""
            name = row["implementation"].removesuffix(", 1 thread")
            groups.setdefault((backend + threads, row["classes"]), {})[name] = row
        for (label, classes), rows in groups.items():
            theirs = rows["torchmetrics"]
            cells = [
                f"{rows[name]['median_ms']:.0f} "
                f"({theirs['median_ms'] / rows[name]['median_ms']:.1f}x)"
                for name in names
            ]
            error = max(
                (rows[name]["error"] for name in names if rows[name]["error"] >= 0),
                default=float("nan"),
            )
            lines.append(
                f"| {label} | {classes} | " + " | ".join(cells) + " | "
                f"{theirs['median_ms']:.0f} | {error:.0e} / {theirs['error']:.0e} |"
            )
    lines += ["", *_ratio_lines(results)]
    lines += [
        "",
        "### Temperature scaling",
        "",
        f"{TS_SHAPE[0]:,} x {TS_SHAPE[1]} logits, 1.5 times a calibrated set "
        "(the fitted temperature should be close to 1.5).",
        "",
        "| backend | step | median ms | fitted T |",
        "|---|---|---|---|",
    ]
    for backend, result in results.items():
        for row in result["temperature"]:
            lines.append(
                f"| {backend} | {row['case']} | {row['median_ms']:.0f} | "
                f"{row['temperature']:.4f} |"
            )
    lines += [
        "",
        f"Reproduce with `python -m benchmarks.perf_metrics` (`--repeats {repeats}`).",
    ]
    return "\n".join(lines)


def _ratio_lines(results):
    """Per backend and K: the median and smallest eager speed ratio."""
    lines = [
        "Eager speed over torchmetrics' (its median time over each metric's), "
        "median and smallest over the five metrics:",
        "",
    ]
    for backend, result in results.items():
        groups = {}
        for row in result["ece"]:
            groups.setdefault(
                (row["implementation"].endswith("thread"), row["classes"]), {}
            )[row["implementation"].removesuffix(", 1 thread")] = row
        for (one_thread, classes), rows in sorted(groups.items()):
            theirs = rows["torchmetrics"]["median_ms"]
            ratios = [theirs / rows[name]["median_ms"] for name in STREAMED]
            label = backend + (", 1 thread" if one_thread else "")
            lines.append(
                f"- {label}, K = {classes}: median {statistics.median(ratios):.2f}x, "
                f"smallest {min(ratios):.2f}x ("
                + ", ".join(
                    f"{name} {ratio:.2f}x"
                    for name, ratio in zip(STREAMED, ratios, strict=True)
                )
                + ")"
            )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.repeats)
        return
    results = {}
    for backend in args.backends.split(","):
        print(f"running {backend} ...", flush=True)
        results[backend] = run_worker(
            "benchmarks.perf_metrics", backend, "--repeats", args.repeats
        )
    text = _table(results, args.repeats)
    print(text)
    if not args.no_write:
        replace_block(DOC, "perf_metrics", text)


if __name__ == "__main__":
    main()
