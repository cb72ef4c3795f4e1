"""Tables laid out like the paper's Tables 1-2, and reliability diagrams."""

import csv
import dataclasses
import io
import os

import numpy as np

from benchmarks import protocol
from benchmarks import run_config
from benchmarks.store import final_key
from benchmarks.store import selection_key
from benchmarks.store import temperature_scaling_key
from benchmarks.store import write_atomic

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


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a loss and how its hyper-parameter was chosen.

    `scheme` is "none" (plain CE), "accuracy" or "ece" (searched), "ts"
    (CE, T from the paper's grid by ECE) or "ts_nll" (CE, T fitted by NLL).
    Ranks compare the rows of one `block`; the "extra" block is not ranked.
    """

    block: str
    loss: str
    scheme: str

    @property
    def label(self):
        spec = protocol.LOSS_SPECS[self.loss]
        if self.scheme == "none":
            return "CE (α = 0)"
        if self.scheme == "ts":
            return "CE (α = 0, T opt.)"
        if self.scheme == "ts_nll":
            return "CE (α = 0, T fit by NLL)"
        target = "acc." if self.scheme == "accuracy" else "ECE"
        return f"{spec.label} ({spec.symbol} opt. for {target})"


def table_rows(config):
    """The paper's two blocks (for the schemes run), then unranked extras."""
    has_ce = "ce" in config.losses
    rows, extra = [], []
    for scheme, ce_scheme in (("accuracy", "none"), ("ece", "ts")):
        if scheme in config.schemes:
            if has_ce:
                rows.append(Row(scheme, "ce", ce_scheme))
            rows += [Row(scheme, loss, scheme) for loss in config.tuned_losses]
        elif has_ce:
            extra.append(Row("extra", "ce", ce_scheme))
    if has_ce:
        extra.append(Row("extra", "ce", "ts_nll"))
    return rows + extra


class Results:
    """Looks up the test scores of each table row in a run's records."""

    def __init__(self, config, records):
        self.config = config
        self.by_key = {record["key"]: record for record in records}

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
            method = "ece_grid" if row.scheme == "ts" else "nll"
            return record["temperature_scaling"][method]
        selection = self.selection(dataset, seed, row.loss, row.scheme)
        if selection is None:
            return None
        return self.by_key.get(final_key(dataset, seed, row.loss, selection["value"]))

    def per_seed(self, row, dataset, metric):
        values = []
        for seed in self.config.seeds:
            scores = self.scores(row, dataset, seed)
            if scores is not None and scores.get(metric) is not None:
                values.append(scores[metric])
        return values

    def has_metric(self, dataset, metric):
        return any(
            self.per_seed(row, dataset, metric) for row in table_rows(self.config)
        )


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
    for block in ("accuracy", "ece"):
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
    if len(values) < expected:
        text += f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
    return text


def _rank_cell(rank):
    return "–" if rank is None else f"{rank:g}"


@dataclasses.dataclass
class Table:
    header: list
    lines: list  # rows of text cells for table.md
    records: list  # dicts for table.csv


def build_table(config, records, paper=None):
    """The results table, in Markdown cells and in CSV fields."""
    paper = load_paper_tables() if paper is None else paper
    results = Results(config, records)
    rows = table_rows(config)
    acc_ranks = average_ranks(results, rows, "accuracy", True)
    ece_ranks = average_ranks(results, rows, "ece", False)
    with_paper = {
        dataset: any(paper_figures(config, row, dataset, paper) for row in rows)
        for dataset in config.datasets
    }
    with_tce = {
        dataset: results.has_metric(dataset, "tce") for dataset in config.datasets
    }
    header = ["Loss"]
    for dataset in config.datasets:
        title = DATASET_TITLES.get(dataset, dataset)
        header += [f"{title} Acc.", f"{title} ECE"]
        if with_tce[dataset]:
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
            metrics = ["accuracy", "ece"] + (["tce"] if with_tce[dataset] else [])
            for metric in metrics:
                values = results.per_seed(row, dataset, metric)
                line.append(_cell(values, expected))
                mean, std = _mean_std(values)
                short = "acc" if metric == "accuracy" else metric
                fields[f"{dataset}_{short}_mean"] = mean
                fields[f"{dataset}_{short}_std"] = std
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
        lines.append(line)
        csv_rows.append(fields)
    return Table(header, lines, csv_rows)


def markdown_table(header, lines):
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(out)


def other_scores_table(config, records):
    """Test NLL and Brier score per row (not in the paper)."""
    results = Results(config, records)
    header = ["Loss"]
    for dataset in config.datasets:
        title = DATASET_TITLES.get(dataset, dataset)
        header += [f"{title} NLL", f"{title} Brier"]
    lines = []
    for row in table_rows(config):
        line = [row.label]
        for dataset in config.datasets:
            for metric in ("nll", "brier"):
                line.append(_cell(results.per_seed(row, dataset, metric), 0))
        lines.append(line)
    return markdown_table(header, lines)


def selections_table(config, records):
    """The chosen hyper-parameter (or temperature) per row, dataset and seed."""
    results = Results(config, records)
    header = ["Loss"] + [DATASET_TITLES.get(d, d) for d in config.datasets]
    lines = []
    for row in table_rows(config):
        if row.scheme == "none":
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


def _settings_line(config, backend, wall_seconds):
    schedule = f"learning rate {config.learning_rate:g}"
    if config.drops:
        schedule += f" x{config.drop_factor:g} at epochs {list(config.drops)}"
    if config.legacy_decay:
        schedule += f", legacy decay {config.legacy_decay:g}"
    parts = [
        f"Keras backend {backend}",
        f"model {config.model}",
        f"seeds {list(config.seeds)}",
        run_config.count(config.epochs, "epoch"),
        f"SGD (Nesterov momentum 0.9), batch {config.batch_size}, {schedule}",
        f"search hold-out {config.val_fraction:.4g} of the training part",
    ]
    if config.full_batches:
        parts.append("last partial batch of each epoch dropped")
    parts.append(f"wall time of this invocation {wall_seconds / 60:.1f} min")
    return "; ".join(parts) + "."


def write_report(config, store, command, notes, backend, wall_seconds):
    """Writes table.md, table.csv and the reliability diagrams; returns the
    Markdown text."""
    records = store.records()
    table = build_table(config, records)
    text = [f"# Results: profile `{config.profile}`", ""]
    text += [f"Command: `{command}`", ""]
    text += [_settings_line(config, backend, wall_seconds), ""]
    if notes:
        text += ["**This run departs from the paper:** " + "; ".join(notes) + ".", ""]
    text += [
        "Test accuracy and ECE (15 bins), mean ± std over seeds; ranks within "
        "each half of the table (ties at three decimals share the best rank), "
        "averaged over the datasets.",
        "",
    ]
    if any("TCE" in column for column in table.header):
        text += [
            "TCE: true calibration error, mean |p̂(ŷ|x) − p*(ŷ|x)| over the "
            "test points, from the known class probabilities of the synthetic "
            "task.",
            "",
        ]
    text += [markdown_table(table.header, table.lines), ""]
    text += ["## Test NLL and Brier score", "", other_scores_table(config, records)]
    text += ["", "## Chosen hyper-parameter per seed", ""]
    text += [selections_table(config, records), ""]
    text += [
        "Reliability diagrams (`reliability-<dataset>-<loss>.png`) pool the test "
        "predictions of all seeds, so the ECE they show is that of the pooled "
        "predictions, not the mean over seeds of the table.",
        "",
    ]
    markdown = "\n".join(text)
    write_atomic(store.path("table.md"), markdown)
    write_atomic(store.path("table.csv"), table_csv(table))
    store.rewrite_results_file()
    write_reliability_diagrams(config, store, records)
    return markdown


def write_reliability_diagrams(config, store, records):
    """One PNG per dataset and loss, a panel per table row of that loss, on
    the test predictions of all seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_label_relax import plot_reliability_diagram

    results = Results(config, records)
    rows = table_rows(config)
    paths = []
    for dataset in config.datasets:
        for loss in config.losses:
            panels = []
            for row in (row for row in rows if row.loss == loss):
                pooled = _pooled_predictions(results, store, row, dataset)
                if pooled is not None:
                    panels.append((row, *pooled))
            if not panels:
                continue
            figure, axes = plt.subplots(
                1, len(panels), figsize=(4 * len(panels), 4), squeeze=False
            )
            for ax, (row, labels, logits) in zip(axes[0], panels, strict=True):
                plot_reliability_diagram(
                    labels, logits, num_bins=protocol.NUM_BINS, from_logits=True, ax=ax
                )
                ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)}: {row.label}")
            figure.tight_layout()
            path = store.path(f"reliability-{dataset}-{loss}.png")
            temporary = path + ".tmp.png"
            figure.savefig(temporary, dpi=80)
            plt.close(figure)
            os.replace(temporary, path)
            paths.append(path)
    return paths


def _pooled_predictions(results, store, row, dataset):
    labels, logits = [], []
    for seed in results.config.seeds:
        scores = results.scores(row, dataset, seed)
        if scores is None:
            continue
        record = scores
        if row.loss == "ce" and row.scheme.startswith("ts"):
            record = results.by_key[temperature_scaling_key(dataset, seed)]
        seed_logits = store.load_array(record["logits_file"])
        labels.append(store.load_array(record["labels_file"]))
        logits.append(seed_logits / scores.get("temperature", 1.0))
    if not logits:
        return None
    return np.concatenate(labels), np.concatenate(logits)
