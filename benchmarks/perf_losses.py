"""Times loss + gradient of each loss against Keras' sparse cross-entropy.

Every backend runs in its own process. Within one process, each loss and the
baseline `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` are
compiled (`jax.jit`, `tf.function(jit_compile=True)`, `torch.compile`) and
timed in interleaved rounds on the same logits, so that drifts in machine load
hit all of them alike. The table gives the median time of the baseline and the
median of the per-round ratios of each loss to it.

    python -m benchmarks.perf_losses                 # all three backends
    python -m benchmarks.perf_losses --backends jax --no-write
"""

import argparse
import platform
import statistics
import sys
import time

from benchmarks.perf_report import emit_result
from benchmarks.perf_report import machine_description
from benchmarks.perf_report import replace_block
from benchmarks.perf_report import run_worker

SHAPES = ((4096, 10), (4096, 1000), (1024, 32768))
LOSS_NAMES = ("LR", "LS", "CP", "FL")
BACKENDS = ("tensorflow", "jax", "torch")
MARKER = "perf_losses"


def build_losses():
    import keras

    import keras_label_relax as klr

    return {
        "CE": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "LR": klr.LabelRelaxation(alpha=0.1, from_logits=True),
        "LS": klr.LabelSmoothing(alpha=0.1, from_logits=True),
        "CP": klr.ConfidencePenalty(beta=0.5, from_logits=True),
        "FL": klr.FocalLoss(gamma=2.0, from_logits=True),
    }


def compiled_value_and_gradient(loss, labels):
    """A compiled `logits -> (loss, d loss / d logits)` that waits for its result."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(lambda logits: loss(labels, logits)))
        return lambda logits: jax.block_until_ready(step(logits))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(logits):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                value = loss(labels, logits)
            return value, tape.gradient(value, logits)

        return lambda logits: [tensor.numpy() for tensor in step(logits)]
    if backend == "torch":
        import torch

        def value_and_gradient(logits):
            logits = logits.detach().requires_grad_(True)
            value = loss(labels, logits)
            (gradient,) = torch.autograd.grad(value, logits)
            return value, gradient

        step = torch.compile(value_and_gradient)

        def synchronised(logits):
            result = step(logits)
            if logits.is_cuda:
                torch.cuda.synchronize()
            return result

        return synchronised
    raise ValueError(f"Unsupported backend: {backend}")


def _reset_compile_caches():
    """Lets torch.compile start afresh for each shape.

    Every step shares one Python code object; past `torch._dynamo`'s
    recompile limit (8) further steps would silently run eagerly.
    """
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()


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


def measure(rounds):
    """Runs in the worker process: one JSON record per shape."""
    import numpy as np
    from keras import ops

    losses = build_losses()
    records = []
    for batch, num_classes in SHAPES:
        _reset_compile_caches()
        rng = np.random.default_rng(0)
        logits = ops.convert_to_tensor(
            (3 * rng.standard_normal((batch, num_classes))).astype("float32")
        )
        labels = ops.convert_to_tensor(rng.integers(0, num_classes, batch), "int32")
        steps = {
            name: compiled_value_and_gradient(loss, labels)
            for name, loss in losses.items()
        }
        shape_rounds = rounds if batch * num_classes < 1e7 else max(5, rounds // 4)
        times = time_interleaved(steps, logits, shape_rounds)
        ratios = {
            name: statistics.median(
                t / ce for t, ce in zip(times[name], times["CE"], strict=True)
            )
            for name in LOSS_NAMES
        }
        records.append(
            {
                "batch": batch,
                "classes": num_classes,
                "rounds": shape_rounds,
                "ce_ms": 1e3 * statistics.median(times["CE"]),
                "ratios": ratios,
            }
        )
    return records


def format_table(results, device):
    lines = [
        "### Losses",
        "",
        f"Machine: {device}. Median of per-round ratios of (loss + gradient) time "
        "to `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` on the "
        "same backend, compiled, integer labels, float32 logits.",
        "",
        "| backend | B | K | CE (ms) | " + " | ".join(LOSS_NAMES) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(LOSS_NAMES),
    ]
    for backend, records in results.items():
        for record in records:
            ratios = " | ".join(f"{record['ratios'][name]:.2f}x" for name in LOSS_NAMES)
            lines.append(
                f"| {backend} | {record['batch']} | {record['classes']} | "
                f"{record['ce_ms']:.2f} | {ratios} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", default="docs/performance.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit_result(measure(args.rounds))
        return
    results = {}
    for backend in args.backends.split(","):
        print(f"timing {backend} ...", file=sys.stderr, flush=True)
        results[backend] = run_worker(
            "benchmarks.perf_losses", backend, "--rounds", args.rounds
        )
    table = format_table(results, machine_description())
    command = "python -m benchmarks.perf_losses " + " ".join(argv or sys.argv[1:])
    python = platform.python_version()
    block = f"{table}\n\nCommand: `{command.strip()}` (Python {python})."
    print(block)
    if not args.no_write:
        replace_block(args.output, MARKER, block)


if __name__ == "__main__":
    main()
