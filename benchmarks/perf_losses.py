"""Times loss + gradient of each loss against Keras' sparse cross-entropy.

Every backend runs in its own process. Within one process, each loss and the
baseline `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` are
run eagerly (op by op, as `fit` runs on PyTorch by default) and compiled
(`jax.jit`, `tf.function(jit_compile=True)`, `torch.compile`), and timed in
interleaved rounds on the same logits, so that drifts in machine load hit all
of them alike. The table gives the median time of the baseline and the median
of the per-round ratios of each loss to it.

    python -m benchmarks.perf_losses                 # all three backends
    python -m benchmarks.perf_losses --backends jax --modes compiled --no-write
    python -m benchmarks.perf_losses --classes 10,1000 --rounds 5 --no-write
    python -m benchmarks.perf_losses --losses DFL,MbLS --backends jax --no-write
"""

import argparse
import itertools
import platform
import statistics
import sys
import time

from benchmarks.perf_report import emit_result
from benchmarks.perf_report import machine_description
from benchmarks.perf_report import replace_block
from benchmarks.perf_report import run_worker

SHAPES = ((4096, 10), (4096, 1000), (1024, 32768))
LOSS_NAMES = ("LR", "LS", "CP", "FL", "FLSD", "DFL", "MbLS", "Poly")
# Targets on the ratio to the cross-entropy: the paper's four losses, FLSD-53
# and Poly-1 cost at most 1.5x; dual focal and MbLS, which need K-wide passes
# beyond a cross-entropy, 2x; label relaxation 1.1x from K = 1000 on.
TARGETS = {"DFL": 2.0, "MbLS": 2.0}
DEFAULT_TARGET = 1.5
LABEL_RELAXATION_TARGET = 1.10
BACKENDS = ("tensorflow", "jax", "torch")
MODES = ("compiled", "eager")
MARKER = "perf_losses"


def target(name, num_classes):
    if name == "LR" and num_classes >= 1000:
        return LABEL_RELAXATION_TARGET
    return TARGETS.get(name, DEFAULT_TARGET)


def build_losses(names):
    """The baseline "CE" and the losses `names`, keyed by name."""
    import keras

    import keras_label_relax as klr

    losses = {
        "CE": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "LR": klr.LabelRelaxation(alpha=0.1, from_logits=True),
        "LS": klr.LabelSmoothing(alpha=0.1, from_logits=True),
        "CP": klr.ConfidencePenalty(beta=0.5, from_logits=True),
        "FL": klr.FocalLoss(gamma=2.0, from_logits=True),
        "FLSD": klr.SampleDependentFocalLoss(from_logits=True),
        "DFL": klr.DualFocalLoss(gamma=4.0, from_logits=True),
        "MbLS": klr.MarginLabelSmoothing(margin=10.0, weight=0.1),
        "Poly": klr.PolyLoss(epsilon=1.0, from_logits=True),
    }
    return {name: losses[name] for name in ("CE", *names)}


def value_and_gradient_step(loss, labels, compiled):
    """A `logits -> (loss, d loss / d logits)` that waits for its result."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.value_and_grad(lambda logits: loss(labels, logits))
        if compiled:
            step = jax.jit(step)
        return lambda logits: jax.block_until_ready(step(logits))
    if backend == "tensorflow":
        import tensorflow as tf

        def step(logits):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                value = loss(labels, logits)
            return value, tape.gradient(value, logits)

        if compiled:
            step = tf.function(step, jit_compile=True)
        return lambda logits: [tensor.numpy() for tensor in step(logits)]
    if backend == "torch":
        import torch

        def value_and_gradient(logits):
            logits = logits.detach().requires_grad_(True)
            value = loss(labels, logits)
            (gradient,) = torch.autograd.grad(value, logits)
            return value, gradient

        step = torch.compile(value_and_gradient) if compiled else value_and_gradient

        def synchronised(logits):
            result = step(logits)
            if logits.is_cuda:
                torch.cuda.synchronize()
            return result

        return synchronised
    raise ValueError(f"Unsupported backend: {backend}")


def _reset_compile_caches():
    """Lets torch.compile start afresh for each shape, with room for every loss.

    Every step shares one Python code object, compiled once per loss: past
    `torch._dynamo`'s recompile limit (8 by default, fewer than the nine
    losses timed) further steps would silently run eagerly.
    """
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = 4 * len(LOSS_NAMES) + 4


def time_interleaved(steps, logits, rounds, calls_per_turn=3):
    """Per-step lists of wall-clock seconds, one entry per round.

    Each round gives every step a turn of a few calls and keeps the fastest:
    the first call after another step's turn pays for that step's freed
    buffers (page faults on re-allocation), which is not the step's own cost.
    """
    for step in steps.values():
        step(logits)
        step(logits)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            turn = []
            for _ in range(calls_per_turn):
                start = time.perf_counter()
                step(logits)
                turn.append(time.perf_counter() - start)
            times[name].append(min(turn))
    return times


def measure(rounds, modes, classes, names):
    """Runs in the worker process: one JSON record per mode and shape."""
    import numpy as np
    from keras import ops

    losses = build_losses(names)
    records = []
    shapes = [shape for shape in SHAPES if shape[1] in classes]
    for mode, (batch, num_classes) in itertools.product(modes, shapes):
        _reset_compile_caches()
        rng = np.random.default_rng(0)
        logits = ops.convert_to_tensor(
            (3 * rng.standard_normal((batch, num_classes))).astype("float32")
        )
        labels = ops.convert_to_tensor(rng.integers(0, num_classes, batch), "int32")
        steps = {
            name: value_and_gradient_step(loss, labels, mode == "compiled")
            for name, loss in losses.items()
        }
        shape_rounds = rounds if batch * num_classes < 1e7 else max(5, rounds // 4)
        times = time_interleaved(steps, logits, shape_rounds)
        ratios = {
            name: statistics.median(
                t / ce for t, ce in zip(times[name], times["CE"], strict=True)
            )
            for name in names
        }
        records.append(
            {
                "mode": mode,
                "batch": batch,
                "classes": num_classes,
                "rounds": shape_rounds,
                "ce_ms": 1e3 * statistics.median(times["CE"]),
                "ratios": ratios,
            }
        )
    return records


def format_table(results, device, names):
    lines = [
        "### Losses",
        "",
        f"Machine: {device}. Median of per-round ratios of (loss + gradient) time "
        "to `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` on the "
        "same backend and in the same mode, integer labels, float32 logits. "
        "*compiled*: `jax.jit` / `tf.function(jit_compile=True)` / "
        "`torch.compile`; *eager*: op by op (`fit` on PyTorch by default). "
        "LR: `LabelRelaxation(0.1)`, LS: `LabelSmoothing(0.1)`, CP: "
        "`ConfidencePenalty(0.5)`, FL: `FocalLoss(2)`, FLSD: "
        "`SampleDependentFocalLoss()` (FLSD-53), DFL: `DualFocalLoss(4)`, "
        "MbLS: `MarginLabelSmoothing(10, 0.1)`, Poly: `PolyLoss(1)`. "
        "Ratios over their target (1.5x; DFL and MbLS 2.0x; LR 1.10x from "
        "K = 1000) are marked with !.",
        "",
        "| backend | mode | B | K | CE (ms) | " + " | ".join(names) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(names),
    ]
    misses = []
    for backend, records in results.items():
        for record in records:
            cells = []
            for name in names:
                ratio = record["ratios"][name]
                over = ratio > target(name, record["classes"])
                cells.append(f"{ratio:.2f}x" + (" !" if over else ""))
                if over:
                    misses.append(
                        f"{name} {backend} {record['mode']} K={record['classes']} "
                        f"({ratio:.2f}x)"
                    )
            lines.append(
                f"| {backend} | {record['mode']} | {record['batch']} | "
                f"{record['classes']} | {record['ce_ms']:.2f} | {' | '.join(cells)} |"
            )
    lines += ["", "Over target: " + ("; ".join(misses) if misses else "none") + "."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--classes",
        default=",".join(str(num_classes) for _, num_classes in SHAPES),
        help="comma-separated class counts K to time, of " + str(SHAPES),
    )
    parser.add_argument(
        "--losses",
        default=",".join(LOSS_NAMES),
        help="comma-separated losses to time, of " + ",".join(LOSS_NAMES),
    )
    parser.add_argument("--output", default="docs/performance.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.losses.split(",")
    unknown = sorted(set(names) - set(LOSS_NAMES))
    if unknown:
        parser.error(f"--losses: unknown {unknown}; choose from {LOSS_NAMES}")
    if args.worker:
        classes = [int(num_classes) for num_classes in args.classes.split(",")]
        emit_result(measure(args.rounds, args.modes.split(","), classes, names))
        return
    results = {}
    for backend in args.backends.split(","):
        print(f"timing {backend} ...", file=sys.stderr, flush=True)
        results[backend] = run_worker(
            "benchmarks.perf_losses",
            backend,
            "--rounds",
            args.rounds,
            "--modes",
            args.modes,
            "--classes",
            args.classes,
            "--losses",
            args.losses,
        )
    table = format_table(results, machine_description(), names)
    command = "python -m benchmarks.perf_losses " + " ".join(argv or sys.argv[1:])
    python = platform.python_version()
    block = f"{table}\n\nCommand: `{command.strip()}` (Python {python})."
    print(block)
    if not args.no_write:
        replace_block(args.output, MARKER, block)


if __name__ == "__main__":
    main()
