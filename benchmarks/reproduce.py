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
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import cluster  # noqa: E402
from benchmarks import data  # noqa: E402
from benchmarks import plan  # noqa: E402
from benchmarks import protocol  # noqa: E402
from benchmarks import records  # noqa: E402
from benchmarks import run_config  # noqa: E402
from benchmarks.store import SETTINGS_FILE  # noqa: E402
from benchmarks.store import ResultStore  # noqa: E402
from benchmarks.store import selection_key  # noqa: E402
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
    parser.add_argument(
        "--protocol",
        default="paper",
        help="paper (default: the paper's text, the confidence penalty's sign "
        "corrected) or authors-code (what the authors' scripts did)",
    )
    parser.add_argument(
        "--trainer",
        choices=("population", "sequential"),
        help="population: train every training of a phase at once as one "
        "compiled JAX program (default on JAX); sequential: one Model.fit at "
        "a time (default, and the only one, on TensorFlow and PyTorch)",
    )
    parser.add_argument(
        "--population-size",
        type=int,
        help="most trainings per population (default: from the model's size "
        "and the free memory)",
    )
    parser.add_argument("--seeds", type=int, help="number of seeds, 0..N-1")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="first seed: --seeds N --first-seed S runs S..S+N-1 (default 0), "
        "to add seeds to a protocol in separate runs",
    )
    parser.add_argument(
        "--losses",
        default=",".join(protocol.LOSSES),
        help="comma-separated subset of "
        + ",".join(protocol.LOSS_SPECS)
        + " (default: the paper's "
        + ",".join(protocol.LOSSES)
        + "; ce includes the temperature-scaling baseline)",
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
    if args.population_size is not None and args.population_size < 1:
        raise ValueError(
            "`--population-size` must be a positive integer. Received: "
            f"--population-size {args.population_size}"
        )
    return run_config.from_profile(
        args.profile,
        protocol_name=args.protocol,
        seeds=args.seeds,
        first_seed=args.first_seed,
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
                training.make_loss(loss, value, config)
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


class Runner:
    """Executes a run's plan with a trainer and stores every result.

    The searches' trials come first: a population trainer trains them all
    up front (they are known in advance), so every KerasTuner trial then
    finds its result in the store; the sequential trainer trains each trial
    when its search asks for it (on distributed workers, the trials they are
    handed). Once the searches have chosen, the final trainings, the
    cross-entropy baselines and temperature scaling form the next phase.
    """

    def __init__(self, config, store, datasets, trainer, role=None):
        # Imported here, after the options and the data are checked: they
        # import Keras, KerasTuner and a backend, which takes seconds.
        from benchmarks import training
        from benchmarks import tuning

        self.training = training
        self.tuning = tuning
        self.config = config
        self.store = store
        self.role = role
        self.trainer = trainer
        self.tuner_id = cluster.tuner_id()
        self.splits = {
            (name, seed): plan.Splits.make(datasets[name], seed, config)
            for name in config.datasets
            for seed in config.seeds
        }
        if hasattr(trainer, "prepare"):
            trainer.prepare(self.splits)
        sizes = {
            name: plan.part_sizes(len(datasets[name].y), config)
            for name in config.datasets
        }
        self.sizes = sizes
        self.trials = plan.trials(config, sizes)
        self.baselines = plan.baselines(config, sizes) + plan.untuned(config, sizes)
        self.counted = set()
        self.progress = self._make_progress()

    def _make_progress(self):
        planned = list(self.trials)
        if self.role != "worker":
            planned += self.baselines
        count = len(planned)
        units = sum(training.units for training in planned)
        if self.role != "worker":
            finals_count, finals_units = plan.expected_finals(self.config, self.sizes)
            count += finals_count
            units += finals_units
        return Progress(count, units)

    def run(self):
        if self.trainer.name == "population" and self.role != "worker":
            self.execute(self.trials)
        selections = self._searches()
        if self.role == "worker":
            return
        finals = plan.finals(self.config, self.sizes, selections)
        self._skip_agreeing_schemes(finals)
        self.execute(finals + self.baselines)

    def _skip_agreeing_schemes(self, finals):
        """Where both schemes chose the same value, one final training less
        than the progress total counted."""
        config = self.config
        expected = len(config.tuned_losses) * len(config.schemes) * len(config.seeds)
        for dataset in config.datasets:
            planned = sum(1 for training in finals if training.dataset == dataset)
            for _ in range(expected - planned):
                self.progress.skip(self.sizes[dataset]["rest"] * config.epochs)

    def execute(self, trainings, trainer=None):
        """Trains what the store does not hold yet, group by group."""
        trainer = trainer or self.trainer
        todo = []
        for training in trainings:
            record = self.store.get(training.key)
            if record is None:
                todo.append(training)
            else:
                self._report(training, record, None)
        for group in trainer.groups(todo):
            results = trainer.train(group, self.splits)
            for training, (logits, seconds) in zip(group, results, strict=True):
                record = self._record(training, logits, seconds, trainer.name)
                record = self.store.put(training.key, record)
                self._report(training, record, seconds)

    def _searches(self):
        """Runs every KerasTuner search; returns the chosen values."""
        selections = {}
        trials = {training.key: training for training in self.trials}
        for index, (dataset, seed, loss, scheme) in enumerate(self._search_list()):
            spec = protocol.LOSS_SPECS[loss]
            grid = self.config.grids[loss]
            if not self.config.is_searched(loss):
                # No trial trained, so no validation score.
                self._select(dataset, seed, loss, scheme, grid[0], None, selections)
                continue

            def run_trial(values, dataset=dataset, seed=seed, loss=loss):
                param = protocol.LOSS_SPECS[loss].param
                key = trial_key(dataset, seed, loss, values[param])
                return self._trial(trials[key])

            result = self.tuning.grid_search(
                run_trial,
                spec.param,
                grid,
                scheme,
                directory=self.store.path("tuner"),
                project_name=f"{dataset}-seed{seed}-{loss}-{scheme}",
                search_index=index,
            )
            if result is None:
                continue
            self._select(dataset, seed, loss, scheme, *result, selections)
        return selections

    def _select(self, dataset, seed, loss, scheme, value, score, selections):
        self.store.put(
            selection_key(dataset, seed, loss, scheme),
            records.selection_record(dataset, seed, loss, scheme, value, score),
        )
        selections[(dataset, seed, loss, scheme)] = value

    def _search_list(self):
        return [
            (dataset, seed, loss, scheme)
            for dataset in self.config.datasets
            for seed in self.config.seeds
            for loss in self.config.tuned_losses
            for scheme in self.config.schemes
        ]

    def _trial(self, training):
        """The validation metrics of a trial, trained now if not stored."""
        # One trial at a time (a search's, a distributed worker's): a
        # population of one would only add compilations.
        self.execute([training], self.training.SequentialTrainer(self.config))
        record = self.store.get(training.key)
        # Records of older runs may lack the newer metrics.
        names = [name for name in self.training.METRIC_NAMES if name in record]
        return {f"val_{name}": record[name] for name in names}

    def _record(self, training, logits, seconds, trainer_name):
        record = records.training_record(
            self.config, training, seconds, trainer_name, self.tuner_id, _backend()
        )
        split = self.splits[(training.dataset, training.seed)]
        if training.kind == plan.TRIAL:
            scores = self.training.score_logits(logits["val"], split.labels("val"))
            return (
                record
                | scores
                | {
                    "evaluated_on": "validation",
                    "n_evaluated": len(split.labels("val")),
                }
            )
        record |= {"evaluated_on": "test"}
        record |= self._test_scores(split, logits["test"], training.key)
        if training.kind == plan.TEMPERATURE_SCALING:
            calibration = (logits["calibration"], split.labels("calibration"))
            record |= {
                "variant": "temperature_scaling",
                "n_calibration": len(calibration[1]),
                "temperature_scaling": self._temperature_scaling(
                    split, calibration, logits["test"]
                ),
                "calibrators": self._calibrators(split, calibration, logits["test"]),
            }
        return record

    def _temperature_scaling(self, split, calibration, test_logits):
        """Temperatures fitted on the calibration hold-out's logits, by the
        paper's ECE grid and by NLL, and the test scores they give."""
        from keras_label_relax import TemperatureScaling

        num_classes = split.dataset.num_classes
        scaling = TemperatureScaling(_identity_model(num_classes), from_logits=True)
        results = {}
        for method, grid in (
            ("ece_grid", list(protocol.TEMPERATURE_GRID)),
            ("nll", None),
        ):
            temperature = scaling.calibrate(
                *calibration,
                method=method,
                grid=grid,
                batch_size=len(calibration[1]),
            )
            scores = self._test_scores(split, test_logits / temperature, None)
            results[method] = {"temperature": temperature} | scores
        return results

    def _calibrators(self, split, calibration, test_logits):
        """Vector scaling and Dirichlet calibration of the same cross-entropy
        model: not in the paper, reported unranked. The ODIR penalties are
        the class's defaults: choosing them by Kull et al.'s cross-validation
        (432 penalty pairs x 5 folds) would cost more than the quick profile's
        trainings."""
        import keras

        from keras_label_relax import DirichletCalibration
        from keras_label_relax import VectorScaling

        model = _identity_model(split.dataset.num_classes)
        calibrators = {
            "vector_scaling": VectorScaling(model),
            "dirichlet_odir": DirichletCalibration(model),
        }
        results = {}
        for name, calibrator in calibrators.items():
            calibrator.calibrate(*calibration, batch_size=len(test_logits))
            # Called, not `predict()`: that compiles a function per model.
            probabilities = keras.ops.convert_to_numpy(calibrator(test_logits))
            tiny = np.finfo(np.float32).tiny
            scores = np.log(np.maximum(probabilities, tiny))  # softmax(scores) = p
            results[name] = self._test_scores(split, scores, None)
        return results

    def _test_scores(self, split, logits, key):
        labels = split.labels("test")
        scores = self.training.score_logits(logits, labels)
        scores["n_evaluated"] = len(labels)
        if split.dataset.true_probs is not None:
            scores["tce"] = self.training.true_calibration_error(
                logits, split.dataset.true_probs[split.parts["test"]]
            )
        if key is not None:
            scores["logits_file"] = self.store.save_array(key + "-logits", logits)
            scores["labels_file"] = self.store.save_array(key + "-labels", labels)
        return scores

    def _report(self, training, record, seconds):
        if training.key in self.counted:
            return
        self.counted.add(training.key)
        self.progress.finished(describe(record, seconds), training.units, seconds)


def _identity_model(num_classes):
    """A model that returns its input: calibrators fitted on stored logits."""
    import keras

    return keras.Sequential([keras.Input((num_classes,)), keras.layers.Identity()])


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
    trainer = make_trainer(args, config)
    Runner(config, store, datasets, trainer, role=role).run()
    if role == "worker":
        print(
            "This worker's share of the searches is done; the chief writes the tables."
        )
        return 0
    from benchmarks import report

    store.rewrite_results_file()
    markdown, _ = report.write_report(out)
    print()
    print(markdown)
    print(f"Wall time of this invocation {(time.perf_counter() - start) / 60:.1f} min.")
    print(f"Tables, results.jsonl and reliability diagrams in {out}")
    if notes:
        print("This run departs from the paper: " + "; ".join(notes) + ".")
    return 0


def make_trainer(args, config):
    """The trainer asked for, or the backend's default; population training
    needs JAX, and other backends fall back to sequential, saying so."""
    from benchmarks import training

    backend = _backend()
    name = args.trainer or ("population" if backend == "jax" else "sequential")
    if name == "population" and backend != "jax":
        print(
            f"--trainer population needs the JAX backend; the {backend} backend "
            "trains sequentially.",
            flush=True,
        )
        name = "sequential"
    if name == "sequential":
        return training.SequentialTrainer(config, verbose=args.verbose)
    from benchmarks import population

    return population.PopulationTrainer(
        config, population_size=args.population_size, verbose=args.verbose
    )


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
