"""The one schema of a run's records, as `results.jsonl` holds them.

Every record has `kind` (`trial`, `final` or `selection`), `dataset`, `seed`,
`loss` and `value` (the hyper-parameter, `None` for cross-entropy); trainings
add their scores (`accuracy`, `ece`, `nll`, `brier`, ...), where they were
evaluated, the settings they ran with and how long they took. The final
training for temperature scaling has `variant: "temperature_scaling"` and
the scores after each calibrator.
"""

import datetime

from benchmarks import protocol


def training_record(config, training, seconds, trainer, tuner_id, backend):
    """What every training's record holds before its scores."""
    return {
        "kind": "trial" if training.kind == "trial" else "final",
        "profile": config.profile,
        "protocol": config.protocol,
        "dataset": training.dataset,
        "seed": training.seed,
        "loss": training.loss,
        "param": protocol.LOSS_SPECS[training.loss].param,
        "value": training.value,
        "n_train": training.n_train,
        "config": {
            "model": config.model,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "drops": list(config.drops),
            "drop_factor": config.drop_factor,
            "legacy_decay": config.legacy_decay,
            "val_fraction": config.val_fraction,
        },
        "seconds": seconds,
        "trainer": trainer,
        "backend": backend,
        "tuner_id": tuner_id,
        "finished_at": _now(),
    }


def selection_record(dataset, seed, loss, scheme, value, score):
    """The value a search chose and its validation score."""
    return {
        "kind": "selection",
        "dataset": dataset,
        "seed": seed,
        "loss": loss,
        "param": protocol.LOSS_SPECS[loss].param,
        "scheme": scheme,
        "objective": protocol.OBJECTIVES[scheme][0],
        "value": value,
        "score": score,
    }


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")
