"""Reproduces Tables 1-2 of the label relaxation paper with KerasTuner.

    python -m benchmarks.reproduce --profile quick

Per dataset, seed, loss and selection scheme, a KerasTuner `GridSearch` over
the paper's grid on a hold-out of the training part picks the loss's
hyper-parameter by validation accuracy or by validation ECE; the best value
is retrained on the whole training part and its last-epoch model is tested.
Plain cross-entropy and cross-entropy with temperature scaling are the
baselines. See `docs/results.md`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import cluster  # noqa: E402
from benchmarks import data  # noqa: E402
from benchmarks import protocol  # noqa: E402
from benchmarks import run_config  # noqa: E402
from benchmarks.store import SETTINGS_FILE  # noqa: E402
from benchmarks.store import ResultStore  # noqa: E402
from benchmarks.store import final_key  # noqa: E402
from benchmarks.store import selection_key  # noqa: E402
from benchmarks.store import temperature_scaling_key  # noqa: E402
from benchmarks.store import trial_key  # noqa: E402
from benchmarks.store import write_atomic  # noqa: E402

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or the output directory."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce",
        description=(
            "Reproduce the label relaxation paper's Tables 1-2: KerasTuner grid "
            "searches per loss, retraining of the winners, tables beside the "
            "paper's figures."
        ),
    )
    parser.add_argument(
        "--profile",
        default="quick",
        choices=sorted(protocol.PROFILES),
        help="experiment to run (default: quick, embedded data, minutes on a CPU)",
    )
    parser.add_argument("--seeds", type=int, help="number of seeds, 0..N-1")
    parser.add_argument(
        "--losses",
        default=",".join(protocol.LOSSES),
        help="comma-separated subset of ce,ls,cp,fl,lr (ce includes the "
        "temperature-scaling baseline)",
    )
    parser.add_argument(
        "--select",
        default="both",
        choices=("accuracy", "ece", "both"),
        help="objective of the searches: val_accuracy (max), val_ece (min)",
    )
    parser.add_argument("--out", help="output directory (default results/...)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out; finished trials and runs are kept",
    )
    parser.add_argument("--model", help="architecture (CIFAR profiles)")
    parser.add_argument("--epochs", type=int, help="epochs per training")
    parser.add_argument(
        "--val-fraction",
        type=float,
        help="search hold-out of the training part (paper 1/6; authors' code 0.25)",
    )
    parser.add_argument(
        "--legacy-decay",
        action="store_true",
        help="the authors' code's SGD decay=1e-5 (lr / (1 + 1e-5 * step))",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="LOSS=V1,V2,...",
        help="replace a loss's grid, e.g. --grid lr=0.05,0.1 (repeatable)",
    )
    parser.add_argument(
        "--datasets", help="comma-separated subset of the profile's datasets"
    )
    parser.add_argument("--data-dir", help="directory with the dataset files")
    parser.add_argument(
        "--verbose", action="store_true", help="show Keras progress bars"
    )
    return parser.parse_args(argv)


def config_from_args(args):
    grids = {}
    for item in args.grid:
        loss, _, values = item.partition("=")
        try:
            grids[loss.strip()] = [float(value) for value in values.split(",")]
        except ValueError:
            raise ValueError(
                f"`--grid` takes LOSS=v1,v2,... Received: --grid {item}"
            ) from None
    return run_config.from_profile(
        args.profile,
        seeds=args.seeds,
        losses=_split_list(args.losses),
        select=args.select,
        model=args.model,
        epochs=args.epochs,
        val_fraction=args.val_fraction,
        legacy_decay=args.legacy_decay,
        grids=grids,
        datasets=_split_list(args.datasets) if args.datasets else None,
    )


def _split_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def check_grids(config):
    """Builds each loss of the run once, so a bad grid value fails now."""
    from benchmarks import training

    for loss in config.tuned_losses:
        for value in config.grids[loss]:
            try:
                training.make_loss(loss, value)
            except ValueError as error:
                raise ValueError(f"`--grid {loss}=...`: {error}") from None


def prepare_out_dir(args, config, role, command):
    """Creates or checks the output directory; returns its path."""
    if args.resume and not args.out:
        raise UsageError("`--resume` needs the `--out` directory of the run.")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("results", f"{config.profile}-{stamp}")
    settings_path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as file:
            stored = json.load(file)["config"]
        differing = sorted(
            key
            for key in set(stored) | set(config.to_dict())
            if stored.get(key) != config.to_dict().get(key)
        )
        if differing:
            raise UsageError(
                f"{out} holds a run with other settings ({', '.join(differing)} "
                "differ); choose another --out."
            )
        if not args.resume and role != "worker":
            raise UsageError(
                f"{out} already holds a run: pass --resume to continue it, or "
                "choose another --out."
            )
    os.makedirs(out, exist_ok=True)
    if role != "worker" and not os.path.exists(settings_path):
        settings = {"config": config.to_dict(), "command": command}
        write_atomic(settings_path, json.dumps(settings, indent=1))
    return out


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per finished training, with elapsed time and an ETA.

    The ETA fits the seconds of this process's trainings so far as a fixed
    cost per training (building, compiling) plus a cost per example-epoch,
    and applies it to the trainings left.
    """

    def __init__(self, total_count, total_units, stream=None):
        self.total_count = total_count
        self.total_units = total_units
        self.done_count = 0
        self.done_units = 0
        self.timings = []  # (units, seconds) of the trainings run here
        self.start = time.perf_counter()
        self.stream = stream or sys.stdout

    def finished(self, text, units, seconds=None):
        """Reports a training; `seconds=None` means it finished in an earlier
        run (or on another worker) and was reused."""
        self.done_count += 1
        self.done_units += units
        if seconds is not None:
            self.timings.append((units, seconds))
        eta = self.eta()
        width = len(str(self.total_count))
        print(
            f"[{self.done_count:>{width}}/{self.total_count}] {text} | "
            f"elapsed {_clock(time.perf_counter() - self.start)}, "
            f"ETA {'?' if eta is None else _clock(eta)}",
            file=self.stream,
            flush=True,
        )

    def skip(self, units):
        """A training counted in the total that will not happen (both
        selection schemes chose the same value)."""
        self.total_count -= 1
        self.total_units -= units

    def eta(self):
        if not self.timings:
            return None
        units, seconds = (
            np.array(column, float) for column in zip(*self.timings, strict=True)
        )
        count_left = max(self.total_count - self.done_count, 0)
        units_left = max(self.total_units - self.done_units, 0)
        if len(set(units)) > 1:
            per_unit, fixed = np.polyfit(units, seconds, 1)
            if per_unit >= 0 and fixed >= 0:
                return fixed * count_left + per_unit * units_left
        return units_left * seconds.sum() / units.sum()


@dataclasses.dataclass
class SeedData:
    """The splits of one dataset for one seed, as the paper makes them."""

    dataset: object
    seed: int
    rest: object  # the training part
    test: object
    fit: object  # the training part without the search hold-out
    val: object
    fit_ts: object  # the training part without the calibration hold-out
    calibration: object

    @classmethod
    def make(cls, dataset, seed, config):
        rest, test = data.split(dataset, config.test_fraction, seed)
        fit, val = data.split(rest, config.val_fraction, seed)
        fit_ts, calibration = data.split(rest, config.calibration_fraction, seed)
        return cls(dataset, seed, rest, test, fit, val, fit_ts, calibration)


def split_sizes(n, config):
    """Training-set sizes (search, final, temperature scaling) for n examples."""
    rest = n - round(config.test_fraction * n)
    fit = rest - round(config.val_fraction * rest)
    fit_ts = rest - round(config.calibration_fraction * rest)
    return fit, rest, fit_ts


class Runner:
    """Runs the searches and final trainings of one run, in a fixed order."""

    def __init__(self, config, store, datasets, role=None, verbose=False):
        # Imported here, after the options and the data are checked: they
        # import Keras, KerasTuner and a backend, which takes seconds.
        from benchmarks import training
        from benchmarks import tuning

        self.training = training
        self.tuning = tuning
        self.config = config
        self.store = store
        self.datasets = datasets
        self.role = role
        self.verbose = verbose
        self.tuner_id = cluster.tuner_id()
        self.counted = set()
        self.progress = self._make_progress()

    def _make_progress(self):
        count = units = 0
        epochs = self.config.epochs
        for dataset in self.datasets.values():
            fit, rest, fit_ts = split_sizes(len(dataset.y), self.config)
            for _ in self.config.seeds:
                for loss in self.config.tuned_losses:
                    count += len(self.config.grids[loss])
                    units += len(self.config.grids[loss]) * fit * epochs
                    if self.role != "worker":
                        count += len(self.config.schemes)
                        units += len(self.config.schemes) * rest * epochs
                if "ce" in self.config.losses and self.role != "worker":
                    count += 2
                    units += (rest + fit_ts) * epochs
        return Progress(count, units)

    def run(self):
        deferred = []
        search_index = 0
        for name in self.config.datasets:
            for seed in self.config.seeds:
                seed_data = SeedData.make(self.datasets[name], seed, self.config)
                finals = []
                for loss in self.config.tuned_losses:
                    for scheme in self.config.schemes:
                        value = self._search(seed_data, loss, scheme, search_index)
                        search_index += 1
                        if value is not None:
                            finals.append((self._final, (seed_data, loss, value)))
                if "ce" in self.config.losses and self.role != "worker":
                    finals.append((self._final, (seed_data, "ce", None)))
                    finals.append((self._temperature_scaling, (seed_data,)))
                if self.role == "chief":
                    # Workers wait for the chief's next search meanwhile.
                    deferred += finals
                else:
                    for function, arguments in finals:
                        function(*arguments)
        for function, arguments in deferred:
            function(*arguments)

    def _search(self, seed_data, loss, scheme, search_index):
        spec = protocol.LOSS_SPECS[loss]
        name = seed_data.dataset.name
        project = f"{name}-seed{seed_data.seed}-{loss}-{scheme}"

        def run_trial(values):
            return self._trial(seed_data, loss, values[spec.param])

        result = self.tuning.grid_search(
            run_trial,
            spec.param,
            self.config.grids[loss],
            scheme,
            directory=self.store.path("tuner"),
            project_name=project,
            search_index=search_index,
        )
        if result is None:
            return None
        value, score = result
        objective = protocol.OBJECTIVES[scheme][0]
        self.store.put(
            selection_key(name, seed_data.seed, loss, scheme),
            {
                "kind": "selection",
                "dataset": name,
                "seed": seed_data.seed,
                "loss": loss,
                "param": spec.param,
                "scheme": scheme,
                "objective": objective,
                "value": value,
                "score": score,
            },
        )
        return value

    def _trial(self, seed_data, loss, value):
        key = trial_key(seed_data.dataset.name, seed_data.seed, loss, value)
        record = self.store.get(key)
        units = len(seed_data.fit.y) * self.config.epochs
        if record is None:
            train_x, val_x = self.training.input_arrays(
                self.config, seed_data.fit, seed_data.val
            )
            model, seconds = self._train(train_x, seed_data.fit, loss, value, seed_data)
            logits = self.training.predict_logits(model, val_x)
            scores = self.training.score_logits(logits, seed_data.val.y)
            record = self.store.put(
                key,
                self._record("trial", seed_data, loss, value, seconds)
                | {"evaluated_on": "validation", "n_train": len(seed_data.fit.y)}
                | {"n_evaluated": len(seed_data.val.y)}
                | scores,
            )
            self._report(key, record, units, seconds)
        else:
            self._report(key, record, units, None)
        return {f"val_{name}": record[name] for name in self.training.METRIC_NAMES}

    def _final(self, seed_data, loss, value):
        key = final_key(seed_data.dataset.name, seed_data.seed, loss, value)
        units = len(seed_data.rest.y) * self.config.epochs
        record = self.store.get(key)
        if record is not None:
            if key in self.counted:
                self.progress.skip(units)
            else:
                self._report(key, record, units, None)
            return
        train_x, test_x = self.training.input_arrays(
            self.config, seed_data.rest, seed_data.test
        )
        model, seconds = self._train(train_x, seed_data.rest, loss, value, seed_data)
        logits = self.training.predict_logits(model, test_x)
        record = self._record("final", seed_data, loss, value, seconds)
        record |= {"evaluated_on": "test", "n_train": len(seed_data.rest.y)}
        record |= self._test_scores(seed_data, logits, key)
        record = self.store.put(key, record)
        self._report(key, record, units, seconds)

    def _temperature_scaling(self, seed_data):
        from keras_label_relax import TemperatureScaling

        key = temperature_scaling_key(seed_data.dataset.name, seed_data.seed)
        units = len(seed_data.fit_ts.y) * self.config.epochs
        record = self.store.get(key)
        if record is not None:
            self._report(key, record, units, None)
            return
        train_x, calibration_x, test_x = self.training.input_arrays(
            self.config, seed_data.fit_ts, seed_data.calibration, seed_data.test
        )
        model, seconds = self._train(train_x, seed_data.fit_ts, "ce", None, seed_data)
        logits = self.training.predict_logits(model, test_x)
        record = self._record("final", seed_data, "ce", None, seconds)
        record |= {
            "variant": "temperature_scaling",
            "evaluated_on": "test",
            "n_train": len(seed_data.fit_ts.y),
            "n_calibration": len(seed_data.calibration.y),
        }
        record |= self._test_scores(seed_data, logits, key)
        scaling = TemperatureScaling(model, from_logits=True)
        record["temperature_scaling"] = {}
        for method, grid in (
            ("ece_grid", list(protocol.TEMPERATURE_GRID)),
            ("nll", None),
        ):
            temperature = scaling.calibrate(
                calibration_x,
                seed_data.calibration.y,
                method=method,
                grid=grid,
                batch_size=1024,
            )
            scores = self._test_scores(seed_data, logits / temperature, None)
            record["temperature_scaling"][method] = {
                "temperature": temperature
            } | scores
        record = self.store.put(key, record)
        self._report(key, record, units, seconds)

    def _train(self, train_x, part, loss, value, seed_data):
        model, seconds = self.training.train_model(
            self.config,
            train_x,
            part.y,
            seed_data.dataset.num_classes,
            loss,
            value,
            seed_data.seed,
            self.verbose,
        )
        return model, seconds

    def _test_scores(self, seed_data, logits, key):
        scores = self.training.score_logits(logits, seed_data.test.y)
        scores["n_evaluated"] = len(seed_data.test.y)
        if seed_data.test.true_probs is not None:
            scores["tce"] = self.training.true_calibration_error(
                logits, seed_data.test.true_probs
            )
        if key is not None:
            scores["logits_file"] = self.store.save_array(key + "-logits", logits)
            scores["labels_file"] = self.store.save_array(
                key + "-labels", seed_data.test.y
            )
        return scores

    def _record(self, kind, seed_data, loss, value, seconds):
        config = self.config
        return {
            "kind": kind,
            "profile": config.profile,
            "dataset": seed_data.dataset.name,
            "seed": seed_data.seed,
            "loss": loss,
            "param": protocol.LOSS_SPECS[loss].param,
            "value": value,
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
            "backend": _backend(),
            "tuner_id": self.tuner_id,
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def _report(self, key, record, units, seconds):
        if key in self.counted:
            return
        self.counted.add(key)
        self.progress.finished(describe(record, seconds), units, seconds)


def describe(record, seconds):
    """One progress line's text for a finished training."""
    spec = protocol.LOSS_SPECS[record["loss"]]
    what = spec.label
    if record["value"] is not None:
        what += f" {spec.param}={record['value']:g}"
    if record.get("variant") == "temperature_scaling":
        what += " (85%, for temperature scaling)"
    kind = "trial" if record["kind"] == "trial" else "final"
    where = "val" if kind == "trial" else "test"
    text = (
        f"{record['dataset']} seed {record['seed']} {kind} {what}: {where} acc "
        f"{record['accuracy']:.3f}, ECE {record['ece']:.3f}"
    )
    if seconds is None:
        return text + " (finished earlier, reused)"
    return text + f" ({seconds:.1f} s)"


def _backend():
    import keras

    return keras.backend.backend()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.reproduce", *argv])
    start = time.perf_counter()
    args = parse_args(argv)
    try:
        role = cluster.distributed_role()
        config = config_from_args(args)
        for name in config.datasets:
            data.check_available(name, args.data_dir)
        check_grids(config)
        out = prepare_out_dir(args, config, role, command)
    except data.DataNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    notes = config.departures()
    _print_header(config, out, role, notes)
    datasets = {
        name: data.load_dataset(name, args.data_dir) for name in config.datasets
    }
    store = ResultStore(out)
    Runner(config, store, datasets, role=role, verbose=args.verbose).run()
    if role == "worker":
        print(
            "This worker's share of the searches is done; the chief writes the tables."
        )
        return 0
    from benchmarks import report

    markdown = report.write_report(
        config, store, command, notes, _backend(), time.perf_counter() - start
    )
    print()
    print(markdown)
    print(f"Tables, results.jsonl and reliability diagrams in {out}")
    if notes:
        print("This run departs from the paper: " + "; ".join(notes) + ".")
    return 0


def _print_header(config, out, role, notes):
    print(
        f"Profile {config.profile}: datasets {', '.join(config.datasets)}; model "
        f"{config.model}; seeds {list(config.seeds)}; "
        f"{run_config.count(config.epochs, 'epoch')}; "
        f"losses {', '.join(config.losses)}; selection by "
        f"{' and '.join(config.schemes)}."
    )
    role_text = f"; distributed {role}" if role else ""
    print(f"Keras backend {_backend()}{role_text}; results in {out}")
    if notes:
        print("This run departs from the paper: " + "; ".join(notes) + ".")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
