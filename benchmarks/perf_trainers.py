"""Wall time of `python -m benchmarks.reproduce` with each trainer.

    python -m benchmarks.perf_trainers [--profile quick] [--write-docs]

Runs the same command once with `--trainer population` and once with
`--trainer sequential`, each in a fresh process and output directory, one
after the other in the same invocation, and reports both wall times and
their ratio (JAX; the sequential trainer is the only one elsewhere).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import perf_report

TRAINERS = ("population", "sequential")


def time_run(trainer, arguments, out):
    """Seconds that one reproduce command takes from start to exit."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "benchmarks.reproduce", *arguments]
    command += ["--trainer", trainer, "--out", out]
    start = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=perf_report.ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}"
        )
    return seconds


def format_block(arguments, seconds, machine):
    command = " ".join(["python -m benchmarks.reproduce", *arguments])
    ratio = seconds["sequential"] / seconds["population"]
    lines = [
        "## Trainers: one run of the benchmark",
        "",
        f"`{command}` with `--trainer population` and with `--trainer "
        "sequential`, JAX backend, one after the other in one invocation of "
        "`python -m benchmarks.perf_trainers`, wall time from start to exit "
        "(imports, data, compilation, searches, tables and diagrams included).",
        "",
        "| trainer | wall time (s) |",
        "|---|---|",
    ]
    lines += [f"| {trainer} | {seconds[trainer]:.1f} |" for trainer in TRAINERS]
    lines += ["", f"Population is {ratio:.1f}x faster. Machine: {machine}."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_trainers")
    parser.add_argument(
        "--args",
        default="",
        help="extra arguments of benchmarks.reproduce (default: the quick "
        "profile as the README runs it)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="update docs/performance.md"
    )
    args = parser.parse_args(argv)
    arguments = args.args.split()
    seconds = {}
    with tempfile.TemporaryDirectory() as root:
        for trainer in TRAINERS:
            seconds[trainer] = time_run(trainer, arguments, os.path.join(root, trainer))
            print(f"{trainer}: {seconds[trainer]:.1f} s", flush=True)
    block = format_block(arguments, seconds, perf_report.machine_description())
    print(block)
    if args.write_docs:
        perf_report.replace_block(
            perf_report.ROOT / "docs" / "performance.md", "perf_trainers", block
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
