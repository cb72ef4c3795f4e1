"""The KerasTuner side: one `GridSearch` per loss, seed and selection scheme.

A trial trains through a callback that first looks in the run's result store:
a grid point trained before (by the other selection scheme's search, by an
earlier interrupted run, or by another worker) is not trained again, and its
stored validation metrics are reported to the oracle instead.

KerasTuner 1.4's `GridSearchOracle` does not save its position in the grid,
so a reloaded GridSearch stops after the trials it had finished. Each search
therefore starts a fresh oracle (`overwrite=True`) and relies on the result
store to make finished trials free.

Distributed mode (`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`,
`KERASTUNER_ORACLE_PORT`): the chief serves each search's oracle and workers
run its trials. A chief serves one search at a time and keeps serving until
every worker has been told that search is over, so search number `k` of the
run uses port `KERASTUNER_ORACLE_PORT + k`: a worker that moves on to the next
search never talks to the previous search's oracle.
"""

import contextlib
import os

import keras_tuner

from benchmarks import protocol
from benchmarks.cluster import PORT_VARIABLE
from benchmarks.cluster import distributed_role


class CachedGridSearch(keras_tuner.GridSearch):
    """`GridSearch` whose trials are run by `run_fn(values) -> metrics`.

    `run_fn` gets the trial's hyper-parameter values and returns a dict that
    holds the objective (e.g. `{"val_accuracy": ..., "val_ece": ...}`).
    """

    def __init__(self, run_fn, **kwargs):
        self._run_fn = run_fn
        super().__init__(hypermodel=None, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        try:
            return self._run_fn(dict(trial.hyperparameters.values))
        except Exception as error:
            # KerasTuner would log a failed trial and go on; in a benchmark a
            # failing trial is a bug, so stop the run with its cause.
            raise keras_tuner.errors.FatalError(
                f"Trial {trial.hyperparameters.values} failed: {error!r}"
            ) from error


def grid_search(run_fn, param, grid, scheme, directory, project_name, search_index=0):
    """Runs one KerasTuner grid search over `param` in `grid`.

    Returns the best trial's `(value, score)` by the scheme's objective, or
    None on a distributed worker (the chief picks the best).
    """
    name, direction = protocol.OBJECTIVES[scheme]
    hyperparameters = keras_tuner.HyperParameters()
    hyperparameters.Choice(param, list(grid))
    role = distributed_role()
    with _search_port(search_index):
        tuner = CachedGridSearch(
            run_fn,
            objective=keras_tuner.Objective(name, direction),
            hyperparameters=hyperparameters,
            directory=directory,
            project_name=project_name,
            overwrite=role != "worker",
        )
        if role is not None:
            address = os.environ["KERASTUNER_ORACLE_IP"]
            print(
                f"{role} {os.environ['KERASTUNER_TUNER_ID']}: search {project_name}, "
                f"oracle at {address}:{os.environ[PORT_VARIABLE]}",
                flush=True,
            )
        with _saved_at_the_end(tuner, alone=role is None):
            tuner.search(verbose=0)
    if role == "worker":
        return None
    best = tuner.oracle.get_best_trials(1)
    if not best or best[0].status != "COMPLETED":
        raise RuntimeError(
            f"The search {project_name!r} finished no trial; see the trial "
            f"messages under {os.path.join(directory, project_name)}."
        )
    return best[0].hyperparameters.get(param), best[0].score


@contextlib.contextmanager
def _saved_at_the_end(tuner, alone):
    """Writes the search's files (oracle, tuner, one per trial) once, when
    it ends, where KerasTuner rewrites them at every step of every trial:
    seven writes a trial, 2,352 in the quick profile, whose trials are
    otherwise only looked up in the result store. Alone, nothing reads the
    files during the search; a distributed search keeps KerasTuner's own
    saving."""
    if not alone:
        yield
        return
    oracle = tuner.oracle
    skipped = ("save", "_save_trial")
    for name in skipped:
        setattr(oracle, name, lambda *args: None)
    tuner.save = lambda: None
    try:
        yield
    finally:
        for name in skipped:
            delattr(oracle, name)
        del tuner.save
        for trial in oracle.trials.values():
            oracle._save_trial(trial)
        tuner.save()


@contextlib.contextmanager
def _search_port(search_index):
    base = os.environ.get(PORT_VARIABLE)
    if base is None or distributed_role() is None:
        yield
        return
    os.environ[PORT_VARIABLE] = str(int(base) + search_index)
    try:
        yield
    finally:
        os.environ[PORT_VARIABLE] = base
