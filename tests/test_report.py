"""Tests of `python -m benchmarks.report` and of the archived runs.

Every run under `docs/runs/<name>/` (`run.json`, `results.jsonl`, `table.md`,
`table.csv`) is rebuilt and must give its committed tables byte for byte,
and every figure that `docs/results.md` or `docs/calibration.md` quotes from
such a run must be the rebuilt one. The convention of those docs:

- a quoted table (or any lines of a run's `table.md`) stands between
  `<!-- table: docs/runs/<name> -->` and `<!-- end table -->`; each of its
  lines must be a line of the rebuilt `table.md`, in the same order (rows
  may be left out);
- a single figure in the text is followed by
  `<!-- figure: docs/runs/<name> | <row label> | <column> -->`, and must be
  the leading number of that cell of the rebuilt `table.md`.
"""

import dataclasses
import functools
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest

from benchmarks import merge
from benchmarks import protocol
from benchmarks import report
from benchmarks import run_config
from benchmarks import store as store_module

REPO = Path(__file__).resolve().parents[1]
ARCHIVED = sorted(path.parent for path in REPO.glob("docs/runs/*/run.json"))
QUOTING_DOCS = [REPO / "docs" / "results.md", REPO / "docs" / "calibration.md"]

TABLE_BLOCK = re.compile(
    r"<!-- table: (?P<run>\S+?)/? -->\n(?P<body>.*?)<!-- end table -->", re.S
)
NUMBER = r"[+\-−]?\d+(?:\.\d+)?"
FIGURE = re.compile(
    rf"(?P<number>{NUMBER})\)?\s*<!-- figure: (?P<run>\S+?)/? \| (?P<row>.+?) "
    r"\| (?P<column>.+?) -->"
)
MARKER = re.compile(r"<!-- (table|figure):")


# Checking quotes against rebuilt runs.


def rebuilt_markdown(run_dir):
    config, records, command, _ = report.load_run(run_dir)
    return report.render(config, records, command)[0]


def markdown_tables(markdown):
    """[(header cells, [row cells, ...]), ...] of the tables in `markdown`."""
    tables, lines = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip("|").split("|")])
        elif lines:
            tables.append((lines[0], lines[2:]))
            lines = []
    return tables


def cell(markdown, row, column):
    """The one cell of `markdown`'s tables in row `row` and column `column`."""
    found = [
        cells[header.index(column)]
        for header, rows in markdown_tables(markdown)
        if column in header
        for cells in rows
        if cells[0] == row
    ]
    # A loss without a hyper-parameter (FLSD-53) has the same row in both
    # halves of the table: one value, so no ambiguity.
    if len(set(found)) != 1:
        raise LookupError(f"{len(found)} cells in row {row!r}, column {column!r}")
    return found[0]


def is_subsequence(lines, of):
    remaining = iter(of)
    return all(any(line == other for other in remaining) for line in lines)


def quote_mismatches(text, root, rebuild=rebuilt_markdown):
    """What in `text` (a doc) disagrees with the runs it quotes, which are
    named relative to `root`."""
    rebuild = functools.lru_cache(maxsize=None)(rebuild)
    problems, checked = [], 0

    def rebuilt(run):
        if not (root / run / "run.json").is_file():
            problems.append(f"{run}: no archived run there")
            return None
        return rebuild(root / run)

    for block in TABLE_BLOCK.finditer(text):
        checked += 1
        markdown = rebuilt(block["run"])
        lines = [line.rstrip() for line in block["body"].splitlines() if line.strip()]
        if markdown is not None and not is_subsequence(lines, markdown.splitlines()):
            problems.append(f"{block['run']}: quoted table differs from the run")
    for figure in FIGURE.finditer(text):
        checked += 1
        markdown = rebuilt(figure["run"])
        if markdown is None:
            continue
        try:
            value = cell(markdown, figure["row"], figure["column"])
        except LookupError as error:
            problems.append(f"{figure['run']}: {error}")
            continue
        leading = re.match(NUMBER, value)
        quoted = figure["number"].replace("−", "-")
        if leading is None or leading.group() != quoted:
            problems.append(
                f"{figure['run']} | {figure['row']} | {figure['column']}: "
                f"quoted {figure['number']}, the run has {value}"
            )
    if checked != len(MARKER.findall(text)):
        problems.append("a table or figure marker does not follow the convention")
    return problems


@pytest.mark.parametrize("run_dir", ARCHIVED, ids=[path.name for path in ARCHIVED])
def test_archived_run_rebuilds_to_its_committed_tables(run_dir):
    config, records, command, unreadable = report.load_run(run_dir)
    markdown, csv_text = report.render(config, records, command)
    assert unreadable == 0
    assert (run_dir / "table.md").read_text(encoding="utf-8") == markdown
    assert (run_dir / "table.csv").read_text(encoding="utf-8") == csv_text


@pytest.mark.parametrize("doc", QUOTING_DOCS, ids=[path.name for path in QUOTING_DOCS])
def test_docs_quote_the_archived_runs(doc):
    assert MARKER.search(doc.read_text(encoding="utf-8"))
    assert quote_mismatches(doc.read_text(encoding="utf-8"), REPO) == []


# A small run made up here.


def fake_config(seeds=3, losses=("ce", "ls", "lr"), datasets=("synthetic",)):
    config = run_config.from_profile("quick", seeds=seeds, losses=losses)
    return dataclasses.replace(config, datasets=datasets)


def scores_for(dataset, seed, loss, scheme, extra=()):
    offset = sum(map(ord, loss + scheme)) % 7 / 1000
    scores = {
        "accuracy": 0.9 + offset + 0.003 * seed,
        "ece": 0.05 - offset + 0.002 * seed * seed,
        "nll": 0.3 + offset,
        "brier": 0.15 + offset,
    }
    if dataset == "synthetic":  # metrics recorded on the synthetic task only
        scores |= {"tce": 0.02 + offset} | {name: 0.07 + offset for name in extra}
    return scores


def fake_records(config, extra_metrics=(), calibrators=()):
    """The records a finished run of `config` would hold."""
    common = {"kind": "final", "seconds": 3.0, "backend": "jax"}
    records = []
    for dataset in config.datasets:
        for seed in config.seeds:
            base = common | {"dataset": dataset, "seed": seed}

            def scores(loss, scheme, base=base, dataset=dataset, seed=seed):
                return base | scores_for(dataset, seed, loss, scheme, extra_metrics)

            key = store_module.final_key(dataset, seed, "ce")
            records.append(scores("ce", "none") | {"key": key, "loss": "ce"})
            ts = scores("ce", "ts") | {
                "key": store_module.temperature_scaling_key(dataset, seed),
                "variant": "temperature_scaling",
                "temperature_scaling": {
                    "ece_grid": scores_for(dataset, seed, "ce", "ts", extra_metrics)
                    | {"temperature": 1.5},
                    "nll": scores_for(dataset, seed, "ce", "ts_nll", extra_metrics)
                    | {"temperature": 1.43},
                },
            }
            if calibrators:
                ts["calibrators"] = {
                    name: scores_for(dataset, seed, "ce", name, extra_metrics)
                    for name in calibrators
                }
            records.append(ts)
            for loss in config.tuned_losses:
                for scheme in config.schemes:
                    value = config.grids[loss][seed if scheme == "ece" else 0]
                    records.append(
                        {
                            "key": store_module.selection_key(
                                dataset, seed, loss, scheme
                            ),
                            "kind": "selection",
                            "value": value,
                        }
                    )
                    key = store_module.final_key(dataset, seed, loss, value)
                    records.append(scores(loss, scheme) | {"key": key, "loss": loss})
                for value in config.grids[loss]:
                    key = store_module.trial_key(dataset, seed, loss, value)
                    records.append(common | {"key": key, "kind": "trial"})
    return records


def write_run(path, config, records, command="python -m benchmarks.reproduce"):
    """A run directory as `benchmarks.reproduce` leaves it."""
    store = store_module.ResultStore(path)
    settings = {"config": config.to_dict(), "command": command}
    (Path(path) / "run.json").write_text(json.dumps(settings, indent=1))
    for record in records:
        store.put(record["key"], record)
    store.rewrite_results_file()
    report.write_report(path)
    return Path(path)


@pytest.fixture
def fake_run(tmp_path):
    config = fake_config()
    return write_run(tmp_path / "run", config, fake_records(config))


def files(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def test_cli_writes_the_same_tables_wherever_and_whenever(fake_run, tmp_path, capsys):
    assert report.main([str(fake_run)]) == 0
    printed = capsys.readouterr().out
    assert "no test logits" in printed
    first = files(fake_run)
    assert {"table.md", "table.csv"} <= set(first)
    assert report.main([str(fake_run), "--out", str(tmp_path / "again")]) == 0
    again = files(tmp_path / "again")
    assert set(again) == {"table.md", "table.csv"}
    assert again["table.md"] == first["table.md"]
    assert again["table.csv"] == first["table.csv"]
    markdown, _ = report.write_report(fake_run)
    assert markdown.encode() == first["table.md"]


def test_cli_runs_as_a_module(fake_run, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(fake_run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| CE (α = 0) |" in completed.stdout


def test_table_states_the_summed_training_time_not_the_wall_time(fake_run):
    markdown = rebuilt_markdown(fake_run)
    # 3 seeds x (2 CE runs + 2 losses x (2 finals + 7 trials)) x 3 s, less
    # seed 0's second finals (both objectives choose the same value there).
    assert "58 trainings of 2.9 min in all" in markdown
    assert "Keras backend jax;" in markdown
    assert "wall time" not in markdown


@pytest.mark.parametrize("case", ["missing", "empty", "no results", "bad settings"])
def test_bad_run_directory_exits_2_and_writes_nothing(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "no results":
        settings = {"config": fake_config().to_dict(), "command": "x"}
        (run / "run.json").write_text(json.dumps(settings))
    if case == "bad settings":
        (run / "run.json").write_text('{"config": {"profile": "quick"}}')
        (run / "results.jsonl").write_text("")
    before = sorted(tmp_path.rglob("*"))
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_out_that_is_a_file_exits_2(fake_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert report.main([str(fake_run), "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_partial_last_line_is_skipped_with_a_warning(fake_run, tmp_path, capsys):
    expected = rebuilt_markdown(fake_run)
    with open(fake_run / "results.jsonl", "a", encoding="utf-8") as file:
        file.write('{"kind": "tri')
    assert report.main([str(fake_run), "--out", str(tmp_path / "out")]) == 0
    assert "skipped 1 line" in capsys.readouterr().err
    assert (tmp_path / "out" / "table.md").read_text(encoding="utf-8") == expected


# Paired differences to temperature scaling.


def test_paired_differences_with_a_bootstrap_interval(fake_run):
    config, records, command, _ = report.load_run(fake_run)
    markdown, csv_text = report.render(config, records, command)
    assert "## Paired difference to CE (α = 0, T opt.)" in markdown
    assert "10,000 resamples" in markdown
    rows = {row["label"]: row for row in _csv_rows(csv_text)}
    reference = rows["CE (α = 0, T opt.)"]
    assert reference["synthetic_acc_diff_mean"] == ""
    for label in ("LS (α opt. for ECE)", "CE (α = 0)", "CE (α = 0, T fit by NLL)"):
        row = rows[label]
        for short in ("acc", "ece"):
            expected = float(row[f"synthetic_{short}_mean"]) - float(
                reference[f"synthetic_{short}_mean"]
            )
            mean = float(row[f"synthetic_{short}_diff_mean"])
            low = float(row[f"synthetic_{short}_diff_low"])
            high = float(row[f"synthetic_{short}_diff_high"])
            assert mean == pytest.approx(expected, abs=1e-12)
            assert low <= mean <= high
        assert row["synthetic_diff_seeds"] == "3"
    table = _section_table(markdown, "## Paired difference")
    assert [line[0] for line in table[1]] == [
        row.label
        for row in report.Results(config, records).rows
        if (row.loss, row.scheme) != report.REFERENCE
    ]


def test_bootstrap_interval_against_a_reference():
    values = np.array([0.01, -0.004, 0.02, 0.003, 0.0])
    rng = np.random.default_rng(report.BOOTSTRAP_SEED)
    means = [
        values[rng.integers(0, 5, 5)].mean() for _ in range(report.BOOTSTRAP_RESAMPLES)
    ]
    low, high = report.bootstrap_interval(values)
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert report.bootstrap_interval(values) == (low, high)
    assert report.bootstrap_interval([0.02, 0.02, 0.02]) == pytest.approx((0.02, 0.02))


def test_runs_of_fewer_than_three_seeds_have_no_paired_table(tmp_path):
    config = fake_config(seeds=2)
    run = write_run(tmp_path / "run", config, fake_records(config))
    markdown = rebuilt_markdown(run)
    assert "Paired difference" not in markdown
    _, csv_text = report.render(*report.load_run(run)[:3])
    assert "_diff_" not in csv_text


def test_a_missing_seed_is_left_out_of_the_pairs(tmp_path):
    config = fake_config(seeds=4)
    records = fake_records(config)
    dropped = store_module.selection_key("synthetic", 3, "lr", "ece")
    records = [record for record in records if record["key"] != dropped]
    run = write_run(tmp_path / "run", config, records)
    markdown = rebuilt_markdown(run)
    value = cell(markdown, "LR (α opt. for ECE)", "Synthetic Δ ECE")
    assert value.endswith("(3 seeds)") and "[" in value


# Rows that other parts of the study add.


def _non_paper_spec(key, label):
    return types.SimpleNamespace(
        key=key, label=label, param="eps", symbol="ε", grid=(0.5, 1.0, 2.0), paper=False
    )


def test_losses_not_in_the_paper_are_listed_and_ranked_apart(tmp_path, monkeypatch):
    monkeypatch.setitem(protocol.LOSS_SPECS, "poly", _non_paper_spec("poly", "Poly"))
    monkeypatch.setitem(protocol.LOSS_SPECS, "mbls", _non_paper_spec("mbls", "MbLS"))
    paper_only = fake_config(losses=protocol.LOSSES)
    grids = paper_only.grids | {"poly": (0.5, 1.0, 2.0), "mbls": (0.5, 1.0, 2.0)}
    config = dataclasses.replace(
        paper_only, losses=(*paper_only.losses, "poly", "mbls"), grids=grids
    )
    with_others = report.build_table(config, fake_records(config))
    alone = report.build_table(paper_only, fake_records(paper_only))
    blocks = [(fields["block"], fields["loss"]) for fields in with_others.records]
    assert blocks[: len(alone.records)] == [
        (fields["block"], fields["loss"]) for fields in alone.records
    ]
    assert blocks[len(alone.records) :] == [
        ("other_accuracy", "poly"),
        ("other_accuracy", "mbls"),
        ("other_ece", "poly"),
        ("other_ece", "mbls"),
    ]
    # The paper's rows keep their ranks; the others rank 1-2 among themselves.
    assert with_others.lines[: len(alone.lines)] == alone.lines
    for line in with_others.lines[len(alone.lines) :]:
        assert line[-2] in ("1", "2") and line[-1] in ("1", "2")
    labels = [line[0] for line in with_others.lines[len(alone.lines) :]]
    assert labels == [
        "Poly (ε opt. for acc.)",
        "MbLS (ε opt. for acc.)",
        "Poly (ε opt. for ECE)",
        "MbLS (ε opt. for ECE)",
    ]
    run = write_run(tmp_path / "run", config, fake_records(config))
    assert "not in the paper; they are ranked among themselves" in (
        rebuilt_markdown(run)
    )


def test_paper_losses_keep_their_paper_figures_and_others_have_none(monkeypatch):
    monkeypatch.setitem(protocol.LOSS_SPECS, "poly", _non_paper_spec("poly", "LR"))
    config = run_config.from_profile("fashion_mnist", seeds=1, losses=("ce", "lr"))
    config = dataclasses.replace(
        config, losses=("ce", "lr", "poly"), grids=config.grids | {"poly": (1.0,)}
    )
    table = report.build_table(config, [])
    by_label = {line[0]: line for line in table.lines}
    column = table.header.index("Fashion-MNIST Acc. (paper)")
    assert by_label["LR (α opt. for acc.)"][column] == "0.912 ± 0.003"
    # Same label as LR, but not the paper's loss: no paper figure.
    assert by_label["LR (ε opt. for acc.)"][column] == "–"


def test_calibrator_rows_beside_temperature_scaling(tmp_path):
    config = fake_config()
    records = fake_records(config, calibrators=tuple(report.CALIBRATORS))
    table = report.build_table(config, records)
    labels = [line[0] for line in table.lines]
    at = labels.index("CE (α = 0, T fit by NLL)")
    assert labels[at + 1 : at + 3] == ["CE + vector scaling", "CE + Dirichlet (ODIR)"]
    for line in table.lines[at + 1 : at + 3]:
        assert line[-2:] == ["–", "–"]
    vector = table.records[at + 1]
    assert vector["block"] == "extra"
    expected = scores_for("synthetic", 0, "ce", "vector_scaling")["accuracy"]
    assert vector["synthetic_acc_mean"] == pytest.approx(expected + 0.003)
    run = write_run(tmp_path / "run", config, records)
    markdown = rebuilt_markdown(run)
    assert "| CE + vector scaling |" not in _section(markdown, "## Chosen")
    assert cell(markdown, "CE + Dirichlet (ODIR)", "Synthetic Δ ECE") != "–"


def test_runs_without_calibrators_have_no_calibrator_rows():
    config = fake_config()
    labels = [line[0] for line in report.build_table(config, []).lines]
    assert not set(report.CALIBRATORS.values()) & set(labels)


def test_classwise_ece_column_where_recorded(tmp_path):
    config = fake_config(datasets=("digits", "synthetic"))
    records = fake_records(config, extra_metrics=("classwise_ece",))
    run = write_run(tmp_path / "run", config, records)
    markdown = rebuilt_markdown(run)
    header = markdown_tables(_section(markdown, "## Test NLL"))[0][0]
    assert header == [
        "Loss",
        "Digits NLL",
        "Digits Brier",
        "Synthetic NLL",
        "Synthetic Brier",
        "Synthetic cw-ECE",
    ]
    assert cell(markdown, "LS (α opt. for ECE)", "Synthetic cw-ECE").startswith("0.07")
    csv_row = _csv_rows(report.render(*report.load_run(run)[:3])[1])[0]
    assert "synthetic_classwise_ece_mean" in csv_row
    assert "digits_classwise_ece_mean" not in csv_row


def test_tce_column_and_its_explanation(fake_run):
    markdown = rebuilt_markdown(fake_run)
    assert "Synthetic TCE" in markdown
    assert "|mean p*(ŷ|x) − mean confidence|" in markdown


# The quote checker of docs/results.md.


def test_quote_checker_accepts_true_quotes_and_rejects_edits(fake_run):
    root = fake_run.parent
    markdown = rebuilt_markdown(fake_run)
    main_table = markdown_tables(markdown)[0]
    header = "| " + " | ".join(main_table[0]) + " |"
    row = next(
        line
        for line in markdown.splitlines()
        if line.startswith("| LR (α opt. for ECE)")
    )
    value = cell(markdown, "LR (α opt. for ECE)", "Synthetic ECE").split()[0]
    good = f"Text.\n<!-- table: run -->\n{header}\n{row}\n<!-- end table -->\n"
    good += f"LR reaches ({value}<!-- figure: run | LR (α opt. for ECE) | "
    good += "Synthetic ECE -->).\n"
    assert quote_mismatches(good, root) == []

    edited_row = row.replace(value, "0.001", 1)
    assert len(quote_mismatches(good.replace(row, edited_row), root)) == 1
    wrong_figure = good.replace(f"({value}<!--", "(0.999<!--")
    assert "quoted 0.999" in quote_mismatches(wrong_figure, root)[0]
    unknown = good.replace("<!-- table: run -->", "<!-- table: nowhere -->")
    assert quote_mismatches(unknown, root) == ["nowhere: no archived run there"]
    no_column = good.replace("| Synthetic ECE -->", "| Synthetic ECF -->")
    assert "0 cells" in quote_mismatches(no_column, root)[0]
    malformed = good + "<!-- figure: run LR -->\n"
    assert quote_mismatches(malformed, root) == [
        "a table or figure marker does not follow the convention"
    ]


def test_an_edited_archived_table_fails_its_check(fake_run):
    config, records, command, _ = report.load_run(fake_run)
    markdown, _ = report.render(config, records, command)
    assert (fake_run / "table.md").read_text(encoding="utf-8") == markdown
    edited = markdown.replace("0.9", "0.8", 1)
    (fake_run / "table.md").write_text(edited, encoding="utf-8")
    with pytest.raises(AssertionError):
        test_archived_run_rebuilds_to_its_committed_tables(fake_run)


def split_by_seed(run_dir, tmp_path):
    """The run in `run_dir` as one run per seed, as `--seeds 1 --first-seed S`
    would have recorded them."""
    config, records, _, _ = report.load_run(run_dir)
    runs = []
    for seed in config.seeds:
        own = [r for r in records if f"-seed{seed}-" in r["key"]]
        single = dataclasses.replace(config, seeds=(seed,))
        runs.append(write_run(tmp_path / f"seed{seed}", single, own, f"run {seed}"))
    return runs


def test_merged_seeds_give_the_tables_of_one_run_over_all(fake_run, tmp_path, capsys):
    runs = split_by_seed(fake_run, tmp_path)
    out = tmp_path / "merged"
    assert merge.main([*map(str, runs), "--out", str(out)]) == 0
    merged = (out / "table.md").read_text(encoding="utf-8")
    whole = (fake_run / "table.md").read_text(encoding="utf-8")
    command = f"python -m benchmarks.merge {' '.join(map(str, runs))} --out {out}"
    assert merged == whole.replace("python -m benchmarks.reproduce", command)
    assert "## Paired difference to CE" in merged
    assert (out / "table.csv").read_bytes() == (fake_run / "table.csv").read_bytes()
    settings = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert [source["command"] for source in settings["sources"]] == [
        "run 0",
        "run 1",
        "run 2",
    ]
    test_archived_run_rebuilds_to_its_committed_tables(out)


@pytest.mark.parametrize("case", ["same seed", "other epochs", "one run"])
def test_runs_that_cannot_merge_exit_2_and_write_nothing(
    fake_run, tmp_path, capsys, case
):
    runs = split_by_seed(fake_run, tmp_path)[:2]
    if case == "same seed":
        runs = [runs[0], runs[0]]
    if case == "other epochs":
        config, records, _, _ = report.load_run(runs[1])
        other = dataclasses.replace(config, epochs=config.epochs + 1)
        runs[1] = write_run(tmp_path / "other", other, records)
    if case == "one run":
        runs = runs[:1]
    out = tmp_path / "merged"
    assert merge.main([*map(str, runs), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert {"same seed": "repeats seeds [0]", "other epochs": "differs from"}.get(
        case, "at least two runs"
    ) in error
    assert not out.exists()


def _csv_rows(csv_text):
    import csv

    return list(csv.DictReader(csv_text.splitlines()))


def _section(markdown, heading):
    """The text of `markdown` from the line `heading...` to the next heading."""
    start = next(
        i for i, line in enumerate(markdown.splitlines()) if line.startswith(heading)
    )
    lines = markdown.splitlines()[start + 1 :]
    end = next((i for i, line in enumerate(lines) if line.startswith("#")), len(lines))
    return "\n".join(lines[:end])


def _section_table(markdown, heading):
    return markdown_tables(_section(markdown, heading))[0]


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the plot is tested per backend in test_plotting.py; here one is enough",
)
def test_reliability_diagrams_from_stored_logits(tmp_path, capsys):
    config = fake_config(seeds=1, losses=("ce", "lr"))
    records = fake_records(config)
    run = write_run(tmp_path / "run", config, records)
    store = store_module.ResultStore(run)
    rng = np.random.default_rng(0)
    for record in records:
        if record["kind"] == "final":
            logits = store.save_array(
                record["key"] + "-logits", rng.normal(size=(50, 3))
            )
            labels = store.save_array(record["key"] + "-labels", rng.integers(0, 3, 50))
            store.put(
                record["key"], record | {"logits_file": logits, "labels_file": labels}
            )
    store.rewrite_results_file()
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert "Wrote 2 reliability diagrams." in capsys.readouterr().out
    for loss in ("ce", "lr"):
        assert (tmp_path / "out" / f"reliability-synthetic-{loss}.png").stat().st_size
