"""Tests of `python -m benchmarks.reproduce`: options, tables, outputs, resume.

The end-to-end runs are tiny (digits only, one seed, one epoch, a two-value
grid). The subprocess tests (resume after a kill, distributed KerasTuner) run
under the JAX backend only, to keep the suite's time down.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from benchmarks import protocol
from benchmarks import report
from benchmarks import reproduce
from benchmarks import run_config
from benchmarks import store as store_module

REPO = Path(__file__).resolve().parents[1]
TINY = ["--datasets", "digits", "--seeds", "1", "--epochs", "1", "--losses", "ce,lr"]
TINY += ["--grid", "lr=0.1,0.2"]
PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\] (.*) \| elapsed \d+:\d\d:\d\d, ETA ")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*currentThread|getName:DeprecationWarning"
)
jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="subprocess runs are tested under one backend (JAX) to save time",
)


def read_jsonl(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# The protocol and the options.


def test_profiles_follow_the_papers_protocol():
    fashion = protocol.PROFILES["fashion_mnist"]
    assert fashion.epochs == 50 and fashion.seeds == 10
    assert fashion.schedules == {"dense2x1024": protocol.Schedule(0.05, (30,), 0.3162)}
    assert protocol.PROFILES["mnist"].schedules["dense2x1024"].drops == ()
    cifar100 = protocol.PROFILES["cifar100"]
    assert cifar100.epochs == 300 and cifar100.seeds == 5
    assert cifar100.augment and cifar100.subtract_mean
    assert cifar100.schedules["resnet56v2"] == protocol.Schedule(
        0.1, (75, 150, 225), 0.3162
    )
    assert cifar100.schedules["densenet_bc_100_12"].drops == (150, 225)
    assert protocol.PROFILES["cifar10"].schedules["vgg16"] == protocol.Schedule(
        0.01, (50, 100, 150), 0.1
    )
    assert protocol.LOSS_SPECS["fl"].grid == (0.1, 0.2, 0.5, 1.0, 2.0, 3.5, 5.0)
    assert protocol.LOSS_SPECS["cp"].grid == (0.1, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert protocol.LOSS_SPECS["lr"].grid == protocol.LOSS_SPECS["ls"].grid
    assert protocol.TEMPERATURE_GRID[:5] == (0.25, 0.5, 0.75, 1.0, 1.1)
    assert protocol.TEMPERATURE_GRID[-3:] == (2.0, 2.5, 3.0)
    assert len(protocol.TEMPERATURE_GRID) == 16


def test_fewer_epochs_move_the_learning_rate_drops():
    config = run_config.from_profile("fashion_mnist", epochs=10)
    assert config.drops == (6,)
    config = run_config.from_profile("cifar100", model="resnet56v2", epochs=30)
    assert config.drops == (8, 15, 22)
    assert run_config.from_profile("fashion_mnist").drops == (30,)


def test_paper_settings_have_no_departures_and_shrinking_has():
    assert run_config.from_profile("fashion_mnist").departures() == []
    notes = run_config.from_profile(
        "fashion_mnist",
        seeds=1,
        epochs=5,
        val_fraction=0.25,
        legacy_decay=True,
        grids={"lr": [0.1]},
    ).departures()
    text = "; ".join(notes)
    for expected in (
        "1 seed instead of 10",
        "5 epochs instead of 50",
        "LR grid [0.1]",
        "hold-out 0.25",
        "decay 1e-05",
    ):
        assert expected in text
    assert "not one of the paper's experiments" in "; ".join(
        run_config.from_profile("quick").departures()
    )
    later_seeds = run_config.from_profile("fashion_mnist", seeds=2, first_seed=3)
    assert later_seeds.seeds == (3, 4)
    assert "2 seeds instead of 10" in "; ".join(later_seeds.departures())


def test_learning_rate_drops_at_epoch_boundaries_with_optional_legacy_decay():
    from benchmarks import training

    schedule = training.StepDecay(0.05, [30 * 10], 0.3162)
    rates = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 299, 300)]
    assert rates == pytest.approx([0.05, 0.05, 0.05 * 0.3162])
    legacy = training.StepDecay(0.1, [], 0.1, decay=1e-5)
    rate = float(keras.ops.convert_to_numpy(legacy(1000)))
    assert rate == pytest.approx(0.1 / (1 + 1e-5 * 1000))
    assert training.StepDecay.from_config(legacy.get_config()).decay == 1e-5


def test_cifar_inputs_lose_the_training_pixel_mean():
    import dataclasses

    import numpy as np

    from benchmarks import data
    from benchmarks import training

    rng = np.random.default_rng(0)
    train, test = (
        data.Dataset("cifar10", rng.random((n, 4, 4, 3), np.float32), None, 10)
        for n in (6, 3)
    )
    config = run_config.from_profile("cifar10")
    train_x, test_x = training.input_arrays(config, train.x, test.x)
    mean = train.x.mean(axis=0)
    np.testing.assert_allclose(train_x, train.x - mean, atol=1e-6)
    np.testing.assert_allclose(test_x, test.x - mean, atol=1e-6)
    quick = dataclasses.replace(config, subtract_mean=False)
    assert training.input_arrays(quick, train.x, test.x)[1] is test.x


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "ce,xx"], "--losses"),
        (["--select", "auc"], "invalid choice"),
        (["--profile", "cifar10", "--model", "mlp_small"], "--model"),
        (["--grid", "lr=0.1,abc"], "--grid"),
        (["--grid", "lr=1.5"], "alpha"),
        (["--seeds", "0"], "--seeds"),
        (["--first-seed", "-1"], "--first-seed"),
        (["--val-fraction", "1.0"], "--val-fraction"),
        (["--resume"], "--out"),
        (["--trainer", "population", "--population-size", "0"], "--population-size"),
        (["--protocol", "authors"], "--protocol"),
        (["--trainer", "parallel"], "invalid choice"),
    ],
)
def test_bad_options_fail_before_training(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    if "--resume" not in argv:
        argv = argv + ["--out", str(out)]
    assert run_main(argv + ["--datasets", "digits"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    errors = [line for line in captured.err.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0]
    assert captured.out == ""
    assert not out.exists()


def run_main(argv):
    try:
        return reproduce.main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


def test_missing_data_is_one_clear_error_before_training(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    monkeypatch.setenv("KERAS_HOME", str(empty))
    monkeypatch.delenv("KERAS_LABEL_RELAX_DATA", raising=False)
    out = tmp_path / "out"
    argv = ["--profile", "cifar100", "--data-dir", str(empty), "--out", str(out)]
    assert reproduce.main(argv) == 2
    captured = capsys.readouterr()
    assert "error: Dataset 'cifar100' was not found" in captured.err
    assert str(empty) in captured.err
    assert captured.out == ""
    assert not out.exists()


# Tables.


def _fake_records(config, metric_for):
    """Records of a finished run whose scores come from `metric_for`."""
    records = []
    for dataset in config.datasets:
        for seed in config.seeds:
            scores = metric_for(dataset, seed, "ce", "none")
            records.append(
                {"key": store_module.final_key(dataset, seed, "ce")} | scores
            )
            ts = {
                "ece_grid": metric_for(dataset, seed, "ce", "ts")
                | {"temperature": 1.5},
                "nll": metric_for(dataset, seed, "ce", "ts_nll") | {"temperature": 1.4},
            }
            records.append(
                {
                    "key": store_module.temperature_scaling_key(dataset, seed),
                    "temperature_scaling": ts,
                }
            )
            for loss in config.tuned_losses:
                for scheme in config.schemes:
                    value = config.grids[loss][seed if scheme == "ece" else 0]
                    key = store_module.selection_key(dataset, seed, loss, scheme)
                    records.append({"key": key, "value": value})
                    key = store_module.final_key(dataset, seed, loss, value)
                    records.append(
                        {"key": key} | metric_for(dataset, seed, loss, scheme)
                    )
    return records


def test_table_is_laid_out_like_the_paper_with_its_figures():
    config = run_config.from_profile("fashion_mnist", seeds=2)
    offsets = {"ce": 0.0, "ls": 0.004, "cp": -0.001, "fl": -0.002, "lr": 0.001}

    def metric_for(dataset, seed, loss, scheme):
        accuracy = 0.9 + offsets[loss] + 0.002 * seed
        return {"accuracy": accuracy, "ece": 0.05 + offsets[loss], "nll": 0.3}

    table = report.build_table(config, _fake_records(config, metric_for))
    assert table.header == [
        "Loss",
        "Fashion-MNIST Acc.",
        "Fashion-MNIST ECE",
        "Fashion-MNIST Acc. (paper)",
        "Fashion-MNIST ECE (paper)",
        "Avg. rank Acc.",
        "Avg. rank ECE",
    ]
    labels = [line[0] for line in table.lines]
    assert labels == [
        "CE (α = 0)",
        "LS (α opt. for acc.)",
        "CP (β opt. for acc.)",
        "FL (γ opt. for acc.)",
        "LR (α opt. for acc.)",
        "CE (α = 0, T opt.)",
        "LS (α opt. for ECE)",
        "CP (β opt. for ECE)",
        "FL (γ opt. for ECE)",
        "LR (α opt. for ECE)",
        "CE (α = 0, T fit by NLL)",
    ]
    ce, ls = table.lines[0], table.lines[1]
    assert ce[1] == "0.901 ± 0.001"  # mean and population std over 2 seeds
    assert ce[3] == "0.912 ± 0.003" and ce[4] == "0.129 ± 0.184"  # the paper's
    assert table.lines[5][3] == "0.908 ± 0.004"  # paper's CE with T opt.
    assert ls[5:] == ["1", "5"]  # best accuracy, worst ECE of its half
    assert table.lines[-1][-2:] == ["–", "–"]  # the extra row is not ranked
    markdown = report.markdown_table(table.header, table.lines)
    assert markdown.splitlines()[1] == "|---|---|---|---|---|---|---|"
    rows = list(csv.DictReader(report.table_csv(table).splitlines()))
    assert rows[0]["fashion_mnist_paper_acc_mean"] == "0.912"
    assert float(rows[1]["fashion_mnist_acc_mean"]) == pytest.approx(0.905)
    assert rows[1]["avg_rank_acc"] == "1.0"


def test_ranks_reproduce_the_papers_accuracy_ranks():
    # Table 1's accuracy columns (MNIST, Fashion-MNIST) and its printed
    # average accuracy ranks, for both halves of the table.
    halves = {
        "acc": (
            [0.985, 0.988, 0.985, 0.984, 0.985],
            [0.912, 0.915, 0.911, 0.911, 0.912],
        ),
        "ece": (
            [0.983, 0.987, 0.984, 0.982, 0.985],
            [0.908, 0.915, 0.911, 0.907, 0.911],
        ),
    }
    printed = {"acc": [2, 1, 3, 4.5, 2], "ece": [4, 1, 2.5, 5, 2]}
    for half, (mnist, fashion) in halves.items():
        ranks = zip(
            report.competition_ranks(mnist, True),
            report.competition_ranks(fashion, True),
            strict=True,
        )
        assert [(a + b) / 2 for a, b in ranks] == printed[half]


def test_store_writes_atomically_and_repairs_a_partial_line(tmp_path):
    store = store_module.ResultStore(tmp_path)
    store.put("trial-a", {"kind": "trial", "accuracy": 0.5})
    with open(tmp_path / "results.jsonl", "a", encoding="utf-8") as file:
        file.write('{"kind": "tri')  # a run killed mid-append
    store.put("trial-b", {"kind": "trial", "accuracy": 0.7})
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["key"] == "trial-b"
    assert store.get("trial-a")["accuracy"] == 0.5
    assert store.get("missing") is None
    store.rewrite_results_file()
    assert [r["key"] for r in read_jsonl(tmp_path / "results.jsonl")] == [
        "trial-a",
        "trial-b",
    ]
    assert not [p for p in os.listdir(tmp_path / "records") if p.endswith(".tmp")]


# End to end.


def test_tiny_run_writes_results_tables_and_diagrams(tmp_path, capsys):
    out = tmp_path / "run"
    assert reproduce.main(TINY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "This run departs from the paper" in printed
    assert "1 epoch instead of 16" in printed
    progress = [m.group(3) for m in map(PROGRESS.match, printed.splitlines()) if m]
    trials = [line for line in progress if " trial " in line]
    # The ECE search reuses the accuracy search's two trainings.
    assert len(trials) == 2 and all("reused" not in line for line in trials)
    assert progress[-1].startswith("digits seed 0 final CE (85%")

    records = read_jsonl(out / "results.jsonl")
    kinds = [record["kind"] for record in records]
    assert kinds.count("trial") == 2 and kinds.count("selection") == 2
    assert 3 <= kinds.count("final") <= 4
    for record in records:
        if record["kind"] in ("trial", "final"):
            for field in ("accuracy", "ece", "nll", "brier", "seconds", "seed"):
                assert isinstance(record[field], (int, float)), field
            assert record["config"]["epochs"] == 1
            assert record["config"]["batch_size"] == 64
    ts = next(r for r in records if r.get("variant") == "temperature_scaling")
    assert ts["temperature_scaling"]["ece_grid"]["temperature"] in (
        protocol.TEMPERATURE_GRID
    )
    assert ts["temperature_scaling"]["nll"]["temperature"] > 0

    markdown = (out / "table.md").read_text()
    for label in ("CE (α = 0)", "LR (α opt. for acc.)", "LR (α opt. for ECE)"):
        assert f"| {label} | " in markdown
    assert "departs from the paper" in markdown
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [row["scheme"] for row in rows] == [
        "none",
        "accuracy",
        "ts",
        "ece",
        "ts_nll",
        "vector_scaling",
        "dirichlet_odir",
    ]
    assert 0.0 <= float(rows[1]["digits_acc_mean"]) <= 1.0
    for scores in ts["calibrators"].values():
        assert 0.0 <= scores["classwise_ece"] <= 1.0
    assert (out / "reliability-digits-lr.png").stat().st_size > 1000
    assert (out / "reliability-digits-ce.png").stat().st_size > 1000


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    settings = {"config": run_config.from_profile("quick").to_dict()}
    (out / "run.json").write_text(json.dumps(settings))
    assert reproduce.main(["--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert reproduce.main(["--out", str(out), "--epochs", "3", "--resume"]) == 2
    assert "epochs" in capsys.readouterr().err


def _command(*arguments):
    return [sys.executable, "-u", "-m", "benchmarks.reproduce", *arguments]


def _environment(**extra):
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    return environment


def _kill(processes):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


@jax_only
def test_resume_after_a_kill_keeps_every_finished_result(tmp_path):
    out = tmp_path / "run"
    arguments = [*TINY[:-1], "lr=0.05,0.1,0.2", "--select", "accuracy"]
    arguments += ["--out", str(out)]
    first = subprocess.Popen(
        _command(*arguments),
        cwd=REPO,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in first.stdout:
            if PROGRESS.match(line):
                seen.append(line)
            if len(seen) == 2 or time.monotonic() > deadline:
                first.send_signal(signal.SIGKILL)
                break
    finally:
        _kill([first])
    assert len(seen) == 2
    before = {path.name: path.read_bytes() for path in (out / "records").glob("*.json")}
    assert len(before) >= 2

    second = subprocess.run(
        _command(*arguments, "--resume"),
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    lines = [m.group(3) for m in map(PROGRESS.match, second.stdout.splitlines()) if m]
    reused = [line for line in lines if "reused" in line]
    assert len(reused) >= 2
    after = {path.name: path.read_bytes() for path in (out / "records").glob("*.json")}
    for name, content in before.items():
        assert after[name] == content, f"{name} was redone"
    # 3 trials, 1 selection, 1 final, CE and CE for temperature scaling.
    assert len(after) == 7
    records = read_jsonl(out / "results.jsonl")
    assert sorted(r["kind"] for r in records).count("trial") == 3
    trained = [line for line in lines if "reused" not in line]
    assert len(trained) + len(reused) == 6


def _read_until(process, text, timeout=180):
    """The output of `process` up to the first line holding `text`."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            break
    assert text in "".join(lines), "".join(lines)
    return "".join(lines)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@jax_only
def test_distributed_chief_and_two_workers_run_each_trial_once(tmp_path):
    grid = ["0.01", "0.05", "0.1", "0.2", "0.3"]
    arguments = [*TINY[:6], "--losses", "lr", "--grid", "lr=" + ",".join(grid)]
    # Sequential: the oracle hands the trials to the workers (a population
    # trainer would have the chief train them all first).
    arguments += ["--trainer", "sequential"]
    arguments += ["--select", "accuracy", "--out", str(tmp_path / "run")]
    cluster = {"KERASTUNER_ORACLE_IP": "127.0.0.1"}
    cluster["KERASTUNER_ORACLE_PORT"] = str(_free_port())
    processes = []
    try:
        for name in ("worker0", "worker1"):
            processes.append(
                subprocess.Popen(
                    _command(*arguments),
                    cwd=REPO,
                    env=_environment(**cluster, KERASTUNER_TUNER_ID=name),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        # Start the chief once both workers wait for its oracle, so that both
        # take part in the search.
        early = [_read_until(process, "oracle at 127.0.0.1") for process in processes]
        chief = subprocess.Popen(
            _command(*arguments),
            cwd=REPO,
            env=_environment(**cluster, KERASTUNER_TUNER_ID="chief"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(chief)
        early.append("")
        outputs = [
            before + process.communicate(timeout=300)[0]
            for before, process in zip(early, processes, strict=True)
        ]
    finally:
        _kill(processes)
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    trained = []
    for output in outputs[:2]:
        trained += re.findall(r"trial LR alpha=([\d.]+): val .*\(\d+\.\d s\)", output)
        assert "the chief writes the tables" in output
    assert sorted(trained, key=float) == grid  # every grid point, each once
    assert "| LR (α opt. for acc.) |" in outputs[2]
    trial_ids = {
        record["tuner_id"]
        for record in read_jsonl(tmp_path / "run" / "results.jsonl")
        if record["kind"] == "trial"
    }
    assert trial_ids == {"worker0", "worker1"}  # both took part


def test_an_archived_run_resumes_from_its_results_file(tmp_path):
    first = store_module.ResultStore(tmp_path / "run")
    first.put("trial-digits-seed0-lr=0.1", {"kind": "trial", "accuracy": 0.5})
    first.put("trial-digits-seed0-lr=0.2", {"kind": "trial", "accuracy": 0.6})
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "results.jsonl").write_bytes(
        (tmp_path / "run/results.jsonl").read_bytes()
    )
    store = store_module.ResultStore(archive)
    assert store.get("trial-digits-seed0-lr=0.2")["accuracy"] == 0.6
    assert len(store.records()) == 2


@jax_only
def test_losses_after_the_paper_run_and_rank_apart(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY[:6], "--losses", "ce,lr,flsd,poly", "--grid", "lr=0.1"]
    argv += ["--grid", "poly=-1,1", "--select", "accuracy", "--out", str(out)]
    assert reproduce.main(argv) == 0
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    by_label = {row["label"]: row for row in rows}
    assert by_label["FLSD-53"]["block"] == "other_accuracy"
    assert by_label["Poly-1 (ε opt. for acc.)"]["block"] == "other_accuracy"
    assert by_label["LR (α opt. for acc.)"]["block"] == "accuracy"
    paper_ranks = {by_label[label]["avg_rank_acc"] for label in ("CE (α = 0)",)}
    assert paper_ranks <= {"1", "1.0", "2", "2.0"}  # ranked among CE and LR only
    assert "losses the paper does not compare" in (out / "table.md").read_text()
    keys = {record["key"] for record in store_module.ResultStore(out).records()}
    assert not any(key.startswith("trial-digits-seed0-lr") for key in keys)
    assert "trial-digits-seed0-poly=1" in keys  # a two-value grid is searched
    assert "final-digits-seed0-lr=0.1" in keys  # a one-value grid is not
