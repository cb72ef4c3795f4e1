"""Crash-safe storage of a run's results.

Each finished result is one JSON file under `records/`, written to a temporary
file and moved into place with `os.replace`, so that an interrupted run leaves
either the whole result or none of it. Every new result is also appended, as
one line, to `results.jsonl` (flushed and fsynced); the report rewrites that
file from `records/` so that it ends up holding each result exactly once.
"""

import json
import os
import re
import tempfile

import numpy as np

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "run.json"


class ResultStore:
    """The results of one run, kept under the directory `root`."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self.records_dir = os.path.join(self.root, "records")
        self.arrays_dir = os.path.join(self.root, "predictions")
        os.makedirs(self.records_dir, exist_ok=True)
        os.makedirs(self.arrays_dir, exist_ok=True)
        self._restore_records()

    def _restore_records(self):
        """An archived run (`docs/runs/`) keeps `results.jsonl` but not
        `records/`: rebuild them from it, so that `--resume` continues it."""
        results = self.path(RESULTS_FILE)
        if os.listdir(self.records_dir) or not os.path.exists(results):
            return
        for record in read_results(results)[0]:
            write_atomic(self._record_path(record["key"]), json.dumps(record, indent=1))

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def get(self, key):
        """The record stored under `key`, or None."""
        try:
            with open(self._record_path(key), encoding="utf-8") as file:
                return json.load(file)
        except FileNotFoundError:
            return None

    def put(self, key, record):
        record = dict(record, key=key)
        write_atomic(self._record_path(key), json.dumps(record, indent=1))
        self._append_line(json.dumps(record, sort_keys=True))
        return record

    def records(self):
        """All stored records, sorted by key."""
        names = sorted(os.listdir(self.records_dir))
        records = []
        for name in names:
            if name.endswith(".json"):
                with open(os.path.join(self.records_dir, name), encoding="utf-8") as f:
                    records.append(json.load(f))
        return records

    def save_array(self, name, array):
        path = os.path.join(self.arrays_dir, safe_name(name) + ".npy")
        directory = os.path.dirname(path)
        with tempfile.NamedTemporaryFile(
            dir=directory, suffix=".tmp", delete=False
        ) as f:
            np.save(f, np.asarray(array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
        return os.path.relpath(path, self.root)

    def load_array(self, relative_path):
        return np.load(os.path.join(self.root, relative_path))

    def rewrite_results_file(self):
        lines = [json.dumps(record, sort_keys=True) for record in self.records()]
        write_atomic(self.path(RESULTS_FILE), "".join(line + "\n" for line in lines))

    def _record_path(self, key):
        return os.path.join(self.records_dir, safe_name(key) + ".json")

    def _append_line(self, line):
        path = self.path(RESULTS_FILE)
        with open(path, "a+", encoding="utf-8") as file:
            # A run killed mid-line leaves a partial line: start a fresh one.
            file.seek(0, os.SEEK_END)
            if file.tell() > 0:
                file.seek(file.tell() - 1)
                if file.read(1) != "\n":
                    line = "\n" + line
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())


def read_results(path):
    """The records of a `results.jsonl` file, one per key (the last line of a
    key wins), sorted by key; and the number of lines that are not JSON (a run
    killed mid-line leaves one)."""
    by_key, unreadable = {}, 0
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            by_key[record["key"]] = record
    return [by_key[key] for key in sorted(by_key)], unreadable


def trial_key(dataset, seed, loss, value):
    return f"trial-{dataset}-seed{seed}-{loss}={value:g}"


def final_key(dataset, seed, loss, value=None):
    suffix = "" if value is None else f"={value:g}"
    return f"final-{dataset}-seed{seed}-{loss}{suffix}"


def temperature_scaling_key(dataset, seed):
    return f"final-{dataset}-seed{seed}-ce-temperature-scaling"


def selection_key(dataset, seed, loss, scheme):
    return f"selection-{dataset}-seed{seed}-{loss}-{scheme}"


def safe_name(key):
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", key)


def write_atomic(path, text):
    """Writes `text` to `path` so that readers see the old or the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(
        "w", dir=directory, suffix=".tmp", delete=False, encoding="utf-8"
    ) as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, path)
