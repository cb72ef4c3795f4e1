"""Tables laid out like the paper's Tables 1-2, and reliability diagrams.

    python -m benchmarks.report RUN_DIR [--out DIR]

rebuilds a run's `table.md` and `table.csv` from its `run.json` and
`results.jsonl` alone, byte for byte as `benchmarks.reproduce` wrote them,
and its reliability diagrams when the run's test logits (`predictions/`)
are there.
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys

import numpy as np

from benchmarks import protocol
from benchmarks import run_config
from benchmarks.store import RESULTS_FILE
from benchmarks.store import SETTINGS_FILE
from benchmarks.store import final_key
from benchmarks.store import read_results
from benchmarks.store import selection_key
from benchmarks.store import temperature_scaling_key
from benchmarks.store import write_atomic

EXIT_USAGE = 2
PAPER_TABLES = os.path.join(os.path.dirname(__file__), "paper_tables.csv")
DATASET_TITLES = {
    "digits": "Digits",
    "synthetic": "Synthetic",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}
_PAPER_SCHEMES = {"none": "none", "accuracy": "acc", "ece": "ece", "ts": "ts"}
# Calibrators fitted on the temperature-scaling run's hold-out, beside the
# temperature: the key of the record's `calibrators` field and the row label.
CALIBRATORS = {
    "vector_scaling": "CE + vector scaling",
    "dirichlet_odir": "CE + Dirichlet (ODIR)",
}
# The blocks of rows ranked among themselves: the paper's two halves, then
# the losses that are not in the paper, by the same two objectives.
RANKED_BLOCKS = ("accuracy", "ece", "other_accuracy", "other_ece")
REFERENCE = ("ce", "ts")  # the row the paired differences are taken to
MIN_PAIRED_SEEDS = 3
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a loss and how its hyper-parameter was chosen.

    `scheme` is "none" (plain CE), "accuracy" or "ece" (searched), "ts"
    (CE, T from the paper's grid by ECE), "ts_nll" (CE, T fitted by NLL) or
    a key of `CALIBRATORS`. Ranks compare the rows of one ranked `block`;
    the "extra" block is not ranked.
    """

    block: str
    loss: str
    scheme: str

    @property
    def label(self):
        spec = protocol.LOSS_SPECS[self.loss]
        if self.scheme == "none":
            return "CE (α = 0)" if self.loss == "ce" else spec.label
        if self.scheme == "ts":
            return "CE (α = 0, T opt.)"
        if self.scheme == "ts_nll":
            return "CE (α = 0, T fit by NLL)"
        if self.scheme in CALIBRATORS:
            return CALIBRATORS[self.scheme]
        target = "acc." if self.scheme == "accuracy" else "ECE"
        return f"{spec.label} ({spec.symbol} opt. for {target})"


def is_paper_loss(loss):
    return getattr(protocol.LOSS_SPECS[loss], "paper", True)


def table_rows(config, calibrators=()):
    """The paper's two blocks (for the schemes run), the unranked extras
    (CE with other calibrations; `calibrators` lists those the run has), then
    the losses not in the paper, by the same objectives."""
    has_ce = "ce" in config.losses
    paper_losses = [loss for loss in config.tuned_losses if is_paper_loss(loss)]
    other_losses = [loss for loss in config.tuned_losses if not is_paper_loss(loss)]
    # Losses without a hyper-parameter (FLSD-53) train once, like CE, and
    # stand in both halves.
    untuned = [
        loss
        for loss in config.losses
        if loss != "ce" and not protocol.LOSS_SPECS[loss].param
    ]
    rows, extra, other = [], [], []
    for scheme, ce_scheme in (("accuracy", "none"), ("ece", "ts")):
        if scheme in config.schemes:
            if has_ce:
                rows.append(Row(scheme, "ce", ce_scheme))
            rows += [Row(scheme, loss, scheme) for loss in paper_losses]
            other += [Row(f"other_{scheme}", loss, "none") for loss in untuned]
            other += [Row(f"other_{scheme}", loss, scheme) for loss in other_losses]
        elif has_ce:
            extra.append(Row("extra", "ce", ce_scheme))
    if has_ce:
        extra.append(Row("extra", "ce", "ts_nll"))
        extra += [
            Row("extra", "ce", name) for name in CALIBRATORS if name in calibrators
        ]
    return rows + extra + other


class Results:
    """Looks up the test scores of each table row in a run's records."""

    def __init__(self, config, records):
        self.config = config
        self.records = records
        self.by_key = {record["key"]: record for record in records}
        calibrators = set()
        for record in records:
            calibrators.update(record.get("calibrators") or {})
        self.rows = table_rows(config, calibrators)

    def selection(self, dataset, seed, loss, scheme):
        return self.by_key.get(selection_key(dataset, seed, loss, scheme))

    def scores(self, row, dataset, seed):
        """Test scores of `row` for one seed, or None if not finished."""
        if row.loss == "ce":
            if row.scheme == "none":
                return self.by_key.get(final_key(dataset, seed, "ce"))
            record = self.by_key.get(temperature_scaling_key(dataset, seed))
            if record is None:
                return None
            if row.scheme in CALIBRATORS:
                return (record.get("calibrators") or {}).get(row.scheme)
            method = "ece_grid" if row.scheme == "ts" else "nll"
            return record["temperature_scaling"][method]
        if row.scheme == "none":
            return self.by_key.get(final_key(dataset, seed, row.loss))
        selection = self.selection(dataset, seed, row.loss, row.scheme)
        if selection is None:
            return None
        return self.by_key.get(final_key(dataset, seed, row.loss, selection["value"]))

    def by_seed(self, row, dataset, metric):
        """{seed: score} over the seeds where `row` has `metric`."""
        values = {}
        for seed in self.config.seeds:
            scores = self.scores(row, dataset, seed)
            if scores is not None and scores.get(metric) is not None:
                values[seed] = scores[metric]
        return values

    def per_seed(self, row, dataset, metric):
        return list(self.by_seed(row, dataset, metric).values())

    def has_metric(self, dataset, metric):
        return any(self.per_seed(row, dataset, metric) for row in self.rows)


def load_paper_tables(path=PAPER_TABLES):
    """{(model, dataset, loss, scheme): {"acc_mean": ..., ...}}."""
    with open(path, encoding="utf-8") as file:
        lines = [line for line in file if not line.startswith("#")]
    table = {}
    for entry in csv.DictReader(lines):
        key = (entry["model"], entry["dataset"], entry["loss"], entry["scheme"])
        table[key] = {
            name: float(entry[name])
            for name in ("acc_mean", "acc_std", "ece_mean", "ece_std")
        }
    return table


def paper_figures(config, row, dataset, paper):
    scheme = _PAPER_SCHEMES.get(row.scheme)
    if scheme is None or not is_paper_loss(row.loss):
        return None
    label = protocol.LOSS_SPECS[row.loss].label
    return paper.get((config.model, dataset, label, scheme))


def competition_ranks(values, higher_is_better):
    """Rank 1 is best; ties (at the 3 printed decimals) share the best rank.

    This reproduces how the paper ranks its rounded table entries.
    """
    rounded = [round(value, 3) for value in values]
    sign = -1 if higher_is_better else 1
    return [
        1 + sum(sign * other < sign * value for other in rounded) for value in rounded
    ]


def average_ranks(results, rows, metric, higher_is_better):
    """{row: mean over datasets of its rank within its block}, or None."""
    ranks = {row: [] for row in rows}
    for block in RANKED_BLOCKS:
        members = [row for row in rows if row.block == block]
        for dataset in results.config.datasets:
            means = [_mean(results.per_seed(row, dataset, metric)) for row in members]
            if len(members) < 2 or any(mean is None for mean in means):
                continue
            for row, rank in zip(
                members, competition_ranks(means, higher_is_better), strict=True
            ):
                ranks[row].append(rank)
    return {row: (float(np.mean(r)) if r else None) for row, r in ranks.items()}


def bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """95% percentile bootstrap interval of the mean of `values`.

    The generator is seeded afresh on each call, so the interval depends on
    the values alone.
    """
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def paired_difference(results, row, reference, dataset, metric):
    """(mean, low, high, pairs) of row minus reference, paired by seed; the
    interval is None with fewer than `MIN_PAIRED_SEEDS` pairs."""
    ours = results.by_seed(row, dataset, metric)
    theirs = results.by_seed(reference, dataset, metric)
    differences = [ours[seed] - theirs[seed] for seed in ours if seed in theirs]
    if not differences:
        return None, None, None, 0
    mean = float(np.mean(differences))
    if len(differences) < MIN_PAIRED_SEEDS:
        return mean, None, None, len(differences)
    return (mean, *bootstrap_interval(differences), len(differences))


def _mean(values):
    return float(np.mean(values)) if values else None


def _mean_std(values):
    # Population standard deviation over seeds (numpy's default); none for
    # a single seed.
    if not values:
        return None, None
    std = float(np.std(values)) if len(values) > 1 else None
    return float(np.mean(values)), std


def _cell(values, expected):
    mean, std = _mean_std(values)
    if mean is None:
        return "–"
    text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
    return text + _seeds_note(len(values), expected)


def _seeds_note(count, expected):
    if count >= expected:
        return ""
    return f" ({count} seed{'s' if count > 1 else ''})"


def _signed(value):
    return f"{value:+.3f}".replace("-0.000", "+0.000")


def _rank_cell(rank):
    return "–" if rank is None else f"{rank:g}"


@dataclasses.dataclass
class Table:
    header: list
    lines: list  # rows of text cells for table.md
    records: list  # dicts for table.csv


def build_table(config, records, paper=None):
    """The results table, in Markdown cells and in CSV fields.

    The CSV fields also hold the NLL, Brier score and (where recorded)
    classwise ECE of `other_scores_table`, and the paired differences of
    `paired_table`.
    """
    paper = load_paper_tables() if paper is None else paper
    results = Results(config, records)
    rows = results.rows
    acc_ranks = average_ranks(results, rows, "accuracy", True)
    ece_ranks = average_ranks(results, rows, "ece", False)
    with_paper = {
        dataset: any(paper_figures(config, row, dataset, paper) for row in rows)
        for dataset in config.datasets
    }
    header = ["Loss"]
    for dataset in config.datasets:
        title = DATASET_TITLES.get(dataset, dataset)
        header += [f"{title} Acc.", f"{title} ECE"]
        if results.has_metric(dataset, "tce"):
            header.append(f"{title} TCE")
        if with_paper[dataset]:
            header += [f"{title} Acc. (paper)", f"{title} ECE (paper)"]
    header += ["Avg. rank Acc.", "Avg. rank ECE"]
    lines, csv_rows = [], []
    expected = len(config.seeds)
    for row in rows:
        line = [row.label]
        fields = {
            "block": row.block,
            "loss": row.loss,
            "scheme": row.scheme,
            "label": row.label,
        }
        for dataset in config.datasets:
            for metric in ("accuracy", "ece", "tce"):
                if metric == "tce" and not results.has_metric(dataset, "tce"):
                    continue
                values = results.per_seed(row, dataset, metric)
                line.append(_cell(values, expected))
                _add_mean_std(fields, dataset, metric, values)
            fields[f"{dataset}_seeds"] = len(results.per_seed(row, dataset, "ece"))
            if with_paper[dataset]:
                figures = paper_figures(config, row, dataset, paper) or {}
                for short in ("acc", "ece"):
                    mean = figures.get(f"{short}_mean")
                    std = figures.get(f"{short}_std")
                    fields[f"{dataset}_paper_{short}_mean"] = mean
                    fields[f"{dataset}_paper_{short}_std"] = std
                    line.append("–" if mean is None else f"{mean:.3f} ± {std:.3f}")
        line += [_rank_cell(acc_ranks[row]), _rank_cell(ece_ranks[row])]
        fields["avg_rank_acc"] = acc_ranks[row]
        fields["avg_rank_ece"] = ece_ranks[row]
        for dataset in config.datasets:
            for metric in _other_metrics(results, dataset):
                values = results.per_seed(row, dataset, metric)
                _add_mean_std(fields, dataset, metric, values)
        if _has_paired_table(results):
            _add_paired_fields(fields, results, row)
        lines.append(line)
        csv_rows.append(fields)
    return Table(header, lines, csv_rows)


def _add_mean_std(fields, dataset, metric, values):
    mean, std = _mean_std(values)
    short = "acc" if metric == "accuracy" else metric
    fields[f"{dataset}_{short}_mean"] = mean
    fields[f"{dataset}_{short}_std"] = std


def _add_paired_fields(fields, results, row):
    reference = _reference_row(results)
    for dataset in results.config.datasets:
        pairs = 0
        for metric, short in (("accuracy", "acc"), ("ece", "ece")):
            mean = low = high = None
            if row != reference:
                mean, low, high, pairs = paired_difference(
                    results, row, reference, dataset, metric
                )
            fields[f"{dataset}_{short}_diff_mean"] = mean
            fields[f"{dataset}_{short}_diff_low"] = low
            fields[f"{dataset}_{short}_diff_high"] = high
        fields[f"{dataset}_diff_seeds"] = pairs if row != reference else None


def markdown_table(header, lines):
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _other_metrics(results, dataset):
    metrics = ["nll", "brier"]
    if results.has_metric(dataset, "classwise_ece"):
        metrics.append("classwise_ece")
    return metrics


_OTHER_TITLES = {"nll": "NLL", "brier": "Brier", "classwise_ece": "cw-ECE"}


def other_scores_table(config, records):
    """Test NLL, Brier score and, where recorded, classwise ECE per row (not
    in the paper)."""
    results = Results(config, records)
    header = ["Loss"]
    for dataset in config.datasets:
        title = DATASET_TITLES.get(dataset, dataset)
        header += [
            f"{title} {_OTHER_TITLES[m]}" for m in _other_metrics(results, dataset)
        ]
    lines = []
    for row in results.rows:
        line = [row.label]
        for dataset in config.datasets:
            for metric in _other_metrics(results, dataset):
                line.append(_cell(results.per_seed(row, dataset, metric), 0))
        lines.append(line)
    return markdown_table(header, lines)


def _reference_row(results):
    return next(
        (row for row in results.rows if (row.loss, row.scheme) == REFERENCE), None
    )


def _has_paired_table(results):
    return (
        len(results.config.seeds) >= MIN_PAIRED_SEEDS
        and _reference_row(results) is not None
    )


def paired_table(config, records):
    """Each row minus `CE (α = 0, T opt.)`, paired by seed, with a bootstrap
    interval; None for runs of fewer than 3 seeds or without that row."""
    results = Results(config, records)
    if not _has_paired_table(results):
        return None
    reference = _reference_row(results)
    expected = len(config.seeds)
    header = ["Loss"]
    for dataset in config.datasets:
        title = DATASET_TITLES.get(dataset, dataset)
        header += [f"{title} Δ Acc.", f"{title} Δ ECE"]
    lines = []
    for row in results.rows:
        if row == reference:
            continue
        line = [row.label]
        for dataset in config.datasets:
            for metric in ("accuracy", "ece"):
                mean, low, high, pairs = paired_difference(
                    results, row, reference, dataset, metric
                )
                if mean is None:
                    line.append("–")
                    continue
                text = _signed(mean)
                if low is not None:
                    text += f" [{_signed(low)}, {_signed(high)}]"
                line.append(text + _seeds_note(pairs, expected))
        lines.append(line)
    return markdown_table(header, lines)


def selections_table(config, records):
    """The chosen hyper-parameter (or temperature) per row, dataset and seed."""
    results = Results(config, records)
    header = ["Loss"] + [DATASET_TITLES.get(d, d) for d in config.datasets]
    lines = []
    for row in results.rows:
        if row.scheme == "none" or row.scheme in CALIBRATORS:
            continue
        line = [row.label]
        for dataset in config.datasets:
            chosen = []
            for seed in config.seeds:
                chosen.append(_chosen(results, row, dataset, seed))
            line.append(", ".join(chosen))
        lines.append(line)
    return markdown_table(header, lines)


def _chosen(results, row, dataset, seed):
    if row.loss == "ce":
        scores = results.scores(row, dataset, seed)
        return "–" if scores is None else f"T={scores['temperature']:.3g}"
    selection = results.selection(dataset, seed, row.loss, row.scheme)
    if selection is None:
        return "–"
    return f"{selection['value']:g}"


def table_csv(table):
    fieldnames = list(table.records[0]) if table.records else ["label"]
    for record in table.records:
        fieldnames += [name for name in record if name not in fieldnames]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for record in table.records:
        writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
    return buffer.getvalue()


def training_seconds(records):
    """(number of trainings, their recorded seconds summed)."""
    seconds = [
        record["seconds"]
        for record in records
        if record.get("kind") in ("trial", "final") and record.get("seconds")
    ]
    return len(seconds), math.fsum(seconds)


def _settings_line(config, records):
    schedule = f"learning rate {config.learning_rate:g}"
    if config.drops:
        schedule += f" x{config.drop_factor:g} at epochs {list(config.drops)}"
    if config.legacy_decay:
        schedule += f", legacy decay {config.legacy_decay:g}"
    backends = sorted({r["backend"] for r in records if r.get("backend")})
    parts = [f"Keras backend {', '.join(backends)}"] if backends else []
    parts += [
        f"model {config.model}",
        f"seeds {list(config.seeds)}",
        run_config.count(config.epochs, "epoch"),
        f"SGD (Nesterov momentum 0.9), batch {config.batch_size}, {schedule}",
        f"search hold-out {config.val_fraction:.4g} of the training part",
    ]
    if config.full_batches:
        parts.append("last partial batch of each epoch dropped")
    trainings, seconds = training_seconds(records)
    if trainings:
        parts.append(
            f"{run_config.count(trainings, 'training')} of {seconds / 60:.1f} min "
            "in all (the sum of their recorded times)"
        )
    return "; ".join(parts) + "."


def render(config, records, command):
    """The text of `table.md` and of `table.csv` for a run."""
    table = build_table(config, records)
    notes = config.departures()
    text = [f"# Results: profile `{config.profile}`", ""]
    text += [f"Command: `{command}`", ""]
    text += [_settings_line(config, records), ""]
    if notes:
        text += ["**This run departs from the paper:** " + "; ".join(notes) + ".", ""]
    text += [
        "Test accuracy and ECE (15 bins), mean ± std over seeds; ranks within "
        "each half of the table (ties at three decimals share the best rank), "
        "averaged over the datasets.",
        "",
    ]
    if any(not is_paper_loss(row.loss) for row in Results(config, records).rows):
        text += [
            "The losses below the paper's rows are not in the paper; they are "
            "ranked among themselves, so the ranks of the paper's rows are "
            "those of the paper's losses alone.",
            "",
        ]
    if any("TCE" in column for column in table.header):
        text += [
            "TCE: true calibration error of the synthetic task, the 15-bin ECE "
            "with each prediction's correctness replaced by the true "
            "probability p*(ŷ|x) of its predicted class: per bin of the "
            "confidence, |mean p*(ŷ|x) − mean confidence|, weighted by the "
            "bin's share of the test points. The test labels' noise does not "
            "enter, and a predictor whose confidence matches its true accuracy "
            "scores 0 however sharp it is.",
            "",
        ]
    text += [markdown_table(table.header, table.lines), ""]
    text += ["## Test NLL and Brier score", ""]
    text += [other_scores_table(config, records), ""]
    paired = paired_table(config, records)
    if paired is not None:
        text += ["## Paired difference to CE (α = 0, T opt.)", ""]
        text += [
            "Per seed, the row's test score minus that of CE (α = 0, T opt.) "
            "on the same seed; mean over seeds and, in brackets, a 95% "
            f"percentile bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples "
            f"of the seeds, numpy generator seed {BOOTSTRAP_SEED}). Δ Acc. > 0 "
            "and Δ ECE < 0 are better than temperature scaling.",
            "",
            paired,
            "",
        ]
    text += ["## Chosen hyper-parameter per seed", ""]
    text += [selections_table(config, records), ""]
    text += [
        "Reliability diagrams (`reliability-<dataset>-<loss>.png`) pool the test "
        "predictions of all seeds, so the ECE they show is that of the pooled "
        "predictions, not the mean over seeds of the table.",
        "",
    ]
    return "\n".join(text), table_csv(table)


class UsageError(Exception):
    """A run directory that cannot be reported on."""


def load_run(run_dir):
    """(config, records, command, unreadable lines) of the run in `run_dir`.

    Raises:
        UsageError: naming what is missing or unreadable.
    """
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory.")
    paths = [os.path.join(run_dir, name) for name in (SETTINGS_FILE, RESULTS_FILE)]
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"{path} does not exist: not a benchmark run directory.")
    try:
        with open(paths[0], encoding="utf-8") as file:
            settings = json.load(file)
        config = run_config.from_dict(settings["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{paths[0]} is not a run's settings: {error!r}") from None
    try:
        records, unreadable = read_results(paths[1])
    except KeyError:
        raise UsageError(f"{paths[1]} holds a record without a key.") from None
    return config, records, settings.get("command", ""), unreadable


def write_report(run_dir, out=None):
    """Writes `table.md` and `table.csv` of the run in `run_dir` (its
    `run.json` and `results.jsonl`) into `out` (default `run_dir`), and the
    reliability diagrams when `run_dir` holds the test logits.

    Returns:
        The Markdown text, and the paths of the diagrams written.

    Raises:
        UsageError: when `run_dir` holds no run.
    """
    config, records, command, _ = load_run(run_dir)
    return _write(config, records, command, run_dir, run_dir if out is None else out)


def _write(config, records, command, run_dir, out):
    markdown, csv_text = render(config, records, command)
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "table.md"), markdown)
    write_atomic(os.path.join(out, "table.csv"), csv_text)
    diagrams = []
    if os.path.isdir(os.path.join(run_dir, "predictions")):
        diagrams = write_reliability_diagrams(config, records, run_dir, out)
    return markdown, diagrams


def write_reliability_diagrams(config, records, run_dir, out):
    """One PNG per dataset and loss, a panel per table row of that loss, on
    the test predictions (under `run_dir`) of all seeds pooled."""
    results = Results(config, records)
    figures = {}
    for dataset in config.datasets:
        for loss in config.losses:
            panels = []
            for row in (row for row in results.rows if row.loss == loss):
                pooled = _pooled_predictions(results, run_dir, row, dataset)
                if pooled is not None:
                    panels.append((row, *pooled))
            if panels:
                figures[f"reliability-{dataset}-{loss}.png"] = (dataset, panels)
    if not figures:
        return []
    # Imported only here: plotting imports Keras, which takes seconds.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_label_relax import plot_reliability_diagram

    paths = []
    for name, (dataset, panels) in figures.items():
        figure, axes = plt.subplots(
            1, len(panels), figsize=(4 * len(panels), 4), squeeze=False
        )
        for ax, (row, labels, logits) in zip(axes[0], panels, strict=True):
            plot_reliability_diagram(
                labels, logits, num_bins=protocol.NUM_BINS, from_logits=True, ax=ax
            )
            ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)}: {row.label}")
        _fix_margins(figure, len(panels))
        path = os.path.join(out, name)
        temporary = path + ".tmp.png"
        figure.savefig(temporary, dpi=80)
        plt.close(figure)
        os.replace(temporary, path)
        paths.append(path)
    return paths


def _fix_margins(figure, num_panels):
    """Margins fixed in inches: `tight_layout` would draw every figure once
    more to measure it, a third of the time the diagrams take."""
    width, height = 4 * num_panels, 4
    figure.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.1 / width,
        bottom=0.45 / height,
        top=1 - 0.35 / height,
        wspace=0.3,
    )


def _pooled_predictions(results, run_dir, row, dataset):
    """Labels and (temperature-scaled) logits of `row` over the seeds whose
    arrays are stored; None if there are none."""
    labels, logits = [], []
    for seed in results.config.seeds:
        scores = results.scores(row, dataset, seed)
        if scores is None:
            continue
        record = scores
        if row.scheme in ("ts", "ts_nll"):
            record = results.by_key[temperature_scaling_key(dataset, seed)]
        files = [record.get("logits_file"), record.get("labels_file")]
        if None in files or not all(
            os.path.isfile(os.path.join(run_dir, name)) for name in files
        ):
            continue
        seed_logits = np.load(os.path.join(run_dir, files[0]))
        labels.append(np.load(os.path.join(run_dir, files[1])))
        logits.append(seed_logits / scores.get("temperature", 1.0))
    if not logits:
        return None
    return np.concatenate(labels), np.concatenate(logits)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=(
            "Rebuild a benchmark run's table.md and table.csv from its run.json "
            "and results.jsonl (and its reliability diagrams when its test "
            "logits, predictions/, are there)."
        ),
    )
    parser.add_argument("run_dir", help="the run's directory (the --out of reproduce)")
    parser.add_argument("--out", help="where to write (default: the run directory)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config, records, command, unreadable = load_run(args.run_dir)
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} exists and is not a directory.")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if unreadable:
        print(
            f"warning: skipped {run_config.count(unreadable, 'line')} of "
            f"{RESULTS_FILE} that {'is' if unreadable == 1 else 'are'} not JSON "
            "(a run killed mid-write).",
            file=sys.stderr,
        )
    out = args.out or args.run_dir
    markdown, diagrams = _write(config, records, command, args.run_dir, out)
    print(markdown)
    print(f"Wrote table.md and table.csv to {out}.")
    if diagrams:
        print(f"Wrote {run_config.count(len(diagrams), 'reliability diagram')}.")
    elif not os.path.isdir(os.path.join(args.run_dir, "predictions")):
        print(f"No reliability diagrams: {args.run_dir} has no test logits.")
    else:
        print("No reliability diagrams: no test logits of the table's rows found.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
