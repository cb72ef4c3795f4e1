"""Every training of a run, known up front: the plan that trainers execute.

A run is data flowing one way: profile -> config -> plan -> execute (a
trainer) -> store -> report. The plan lists the searches' trials, the
baselines (cross-entropy, and cross-entropy on the smaller training part that
leaves the calibration hold-out), and, once the searches have chosen, the
final trainings; progress counts come from it.
"""

import dataclasses

import numpy as np

from benchmarks import data
from benchmarks import protocol
from benchmarks.store import final_key
from benchmarks.store import temperature_scaling_key
from benchmarks.store import trial_key

TRIAL = "trial"
FINAL = "final"
TEMPERATURE_SCALING = "temperature_scaling"


@dataclasses.dataclass(frozen=True)
class Training:
    """One model to train: on which part of which split, with which loss.

    `train_part` and `eval_parts` name parts of `Splits` ("fit", "val",
    "rest", "test", "fit_ts", "calibration"); the trainer returns the
    trained model's logits on each of `eval_parts`.
    """

    key: str
    kind: str
    dataset: str
    seed: int
    loss: str
    value: float | None
    train_part: str
    eval_parts: tuple
    n_train: int
    epochs: int

    @property
    def units(self):
        """Example-epochs: what the progress estimate counts."""
        return self.n_train * self.epochs


@dataclasses.dataclass
class Splits:
    """The paper's splits of one dataset for one seed, as index arrays."""

    dataset: object
    seed: int
    parts: dict

    @classmethod
    def make(cls, dataset, seed, config):
        n = len(dataset.y)
        rest, test = data.split_indices(n, config.test_fraction, seed)
        fit, val = data.split_indices(len(rest), config.val_fraction, seed)
        fit_ts, calibration = data.split_indices(
            len(rest), config.calibration_fraction, seed
        )
        parts = {
            "rest": rest,
            "test": test,
            "fit": rest[fit],
            "val": rest[val],
            "fit_ts": rest[fit_ts],
            "calibration": rest[calibration],
        }
        return cls(dataset, seed, parts)

    def part(self, name):
        """The examples of part `name` as a `data.Dataset`."""
        return data.subset(self.dataset, self.parts[name])

    def labels(self, name):
        return self.dataset.y[self.parts[name]]


def part_sizes(n, config):
    """The number of examples in each training part for `n` examples."""
    rest = n - round(config.test_fraction * n)
    return {
        "fit": rest - round(config.val_fraction * rest),
        "rest": rest,
        "fit_ts": rest - round(config.calibration_fraction * rest),
    }


def _training(config, sizes, kind, dataset, seed, loss, value, key):
    train_part, eval_parts = {
        TRIAL: ("fit", ("val",)),
        FINAL: ("rest", ("test",)),
        TEMPERATURE_SCALING: ("fit_ts", ("calibration", "test")),
    }[kind]
    return Training(
        key=key,
        kind=kind,
        dataset=dataset,
        seed=seed,
        loss=loss,
        value=value,
        train_part=train_part,
        eval_parts=eval_parts,
        n_train=sizes[dataset][train_part],
        epochs=config.epochs,
    )


def trials(config, sizes):
    """The searches' trainings: every grid point of every searched loss."""
    planned = []
    for dataset in config.datasets:
        for seed in config.seeds:
            for loss in config.tuned_losses:
                if not config.is_searched(loss):
                    continue
                for value in config.grids[loss]:
                    key = trial_key(dataset, seed, loss, value)
                    planned.append(
                        _training(config, sizes, TRIAL, dataset, seed, loss, value, key)
                    )
    return planned


def baselines(config, sizes):
    """Cross-entropy on the training part, and on the part that leaves the
    calibration hold-out for temperature scaling."""
    if "ce" not in config.losses:
        return []
    planned = []
    for dataset in config.datasets:
        for seed in config.seeds:
            planned.append(
                _training(
                    config,
                    sizes,
                    FINAL,
                    dataset,
                    seed,
                    "ce",
                    None,
                    final_key(dataset, seed, "ce"),
                )
            )
            planned.append(
                _training(
                    config,
                    sizes,
                    TEMPERATURE_SCALING,
                    dataset,
                    seed,
                    "ce",
                    None,
                    temperature_scaling_key(dataset, seed),
                )
            )
    return planned


def finals(config, sizes, selections):
    """The retrainings of the chosen values, once each.

    Args:
        selections: `{(dataset, seed, loss, scheme): value}`.
    """
    planned = {}
    for (dataset, seed, loss, _), value in sorted(
        selections.items(), key=lambda item: item[0]
    ):
        key = final_key(dataset, seed, loss, value)
        planned[key] = _training(config, sizes, FINAL, dataset, seed, loss, value, key)
    return list(planned.values())


def untuned(config, sizes):
    """Losses without a hyper-parameter to search (FLSD-53): trained once
    per seed on the training part, like cross-entropy."""
    planned = []
    for dataset in config.datasets:
        for seed in config.seeds:
            for loss in config.losses:
                if loss != "ce" and not protocol.LOSS_SPECS[loss].param:
                    key = final_key(dataset, seed, loss)
                    planned.append(
                        _training(config, sizes, FINAL, dataset, seed, loss, None, key)
                    )
    return planned


def expected_finals(config, sizes):
    """Count and example-epochs of the final trainings before the searches
    have chosen: one per scheme and tuned loss (fewer when the schemes
    agree)."""
    count = units = 0
    for dataset in config.datasets:
        per_seed = len(config.tuned_losses) * len(config.schemes)
        count += per_seed * len(config.seeds)
        units += per_seed * len(config.seeds) * sizes[dataset]["rest"] * config.epochs
    return count, units


def groups_by_size(trainings):
    """Trainings grouped by `(dataset, training-part size)`, in plan order:
    those that can share one population."""
    groups = {}
    for training in trainings:
        groups.setdefault((training.dataset, training.n_train), []).append(training)
    return list(groups.values())


def batch_orders(num_examples, batch_size, seed, epochs, drop_remainder):
    """The example order of every batch of every epoch: a new permutation per
    epoch from `numpy.random.default_rng(seed)`, cut into batches (the last,
    smaller one dropped if `drop_remainder`).

    Yields:
        For each epoch, a list of index arrays into the training part.
    """
    rng = np.random.default_rng(seed)
    stop = num_examples - num_examples % batch_size if drop_remainder else None
    for _ in range(epochs):
        order = rng.permutation(num_examples)[:stop]
        yield [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
