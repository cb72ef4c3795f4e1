"""One run of several seeds from runs of the same settings on other seeds.

    python -m benchmarks.merge RUN_DIR RUN_DIR ... --out DIR

A protocol's seeds can be trained in separate runs (`python -m
benchmarks.reproduce --seeds 1 --first-seed S`). Merging them gives the run
that one invocation over all those seeds would have recorded: its
`run.json` (the common settings, the seeds' union, and each source's
command), its `results.jsonl` (every source's records) and the `table.md`
and `table.csv` that `python -m benchmarks.report` rebuilds from those two
files, with the mean ± std over all the seeds and, from three seeds on, the
paired differences to temperature scaling. The sources must agree on every
setting but the seeds, and hold different seeds.
"""

import argparse
import dataclasses
import json
import os
import sys

from benchmarks import report
from benchmarks.store import RESULTS_FILE
from benchmarks.store import SETTINGS_FILE
from benchmarks.store import write_atomic


def merge_runs(run_dirs, out, command):
    """Writes the merged run of `run_dirs` to `out`; returns its `table.md`.

    Raises:
        report.UsageError: naming the run that cannot be merged and why.
    """
    if len(run_dirs) < 2:
        raise report.UsageError(f"Give at least two runs to merge, not {run_dirs}.")
    runs = [(run_dir, *report.load_run(run_dir)) for run_dir in run_dirs]
    config = _merged_config(runs)
    records = [record for *_, run_records, _, _ in runs for record in run_records]
    os.makedirs(out, exist_ok=True)
    settings = {
        "config": config.to_dict(),
        "command": command,
        "sources": [
            {"run": os.path.normpath(run_dir), "command": run_command}
            for run_dir, _, _, run_command, _ in runs
        ],
    }
    write_atomic(os.path.join(out, SETTINGS_FILE), json.dumps(settings, indent=1))
    records = sorted(records, key=lambda record: record["key"])
    lines = [json.dumps(record, sort_keys=True) for record in records]
    write_atomic(os.path.join(out, RESULTS_FILE), "\n".join(lines) + "\n")
    markdown, _ = report.write_report(out)
    return markdown


def _merged_config(runs):
    first_dir, first, *_ = runs[0]
    seeds = []
    for run_dir, config, *_ in runs:
        overlap = sorted(set(seeds) & set(config.seeds))
        if overlap:
            raise report.UsageError(
                f"{run_dir} repeats seeds {overlap} of the runs before it."
            )
        differences = _differences(first, config)
        if differences:
            raise report.UsageError(
                f"{run_dir} differs from {first_dir} in {', '.join(differences)}: "
                "only runs of the same settings on other seeds can be merged."
            )
        seeds += config.seeds
    return dataclasses.replace(first, seeds=tuple(sorted(seeds)))


def _differences(config, other):
    """The settings, seeds aside, in which two runs differ. Grids count for
    the runs' losses only: a run records the default grids of every loss,
    and older runs did not know the later losses."""
    differences = [
        field.name
        for field in dataclasses.fields(config)
        if field.name not in ("seeds", "grids")
        and getattr(config, field.name) != getattr(other, field.name)
    ]
    if any(config.grids.get(loss) != other.grids.get(loss) for loss in config.losses):
        differences.append("grids")
    return differences


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.merge",
        description=(
            "Merge benchmark runs of the same settings on different seeds into "
            "one run directory, and write its tables."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", help="the runs to merge")
    parser.add_argument("--out", required=True, help="the merged run's directory")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(
        ["python -m benchmarks.merge", *args.run_dirs, "--out", args.out]
    )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(
            f"error: --out {args.out} exists and is not a directory.", file=sys.stderr
        )
        return report.EXIT_USAGE
    try:
        markdown = merge_runs(args.run_dirs, args.out, command)
    except report.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return report.EXIT_USAGE
    print(markdown)
    print(f"Wrote the merged run to {args.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
