"""Node-local data (root, once-per-node preparation under a file lock, a missing root
naming the node), progress lines, the driver-side reference cache, the sensitivity
oracle's batches, and node tags on trial runs. Fast: no Ray, no search."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_tracking import empty_store, make_tracker, play, report, runs

from orchestrator.config import SearchConfig
from orchestrator.remote import (
    ProgressLine,
    ReferenceCache,
    RemoteSensitivityRunner,
    format_progress,
)
from orchestrator.searchers.sensitivity_dp import measure_sensitivity
from search_spaces import AllowedBits
from search_spaces import metrics as M
from trainables.data import dataset_facts, load_dataset
from trainables.node import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, node_data_root, node_info, node_label
from trainables.sensitivity import SensitivityOracle
from trainables.training import reference_cache_name

NODE_PY = Path(__file__).resolve().parents[1] / "trainables" / "node.py"

# ---- node-local data -----------------------------------------------------------------


def test_data_root_is_node_local_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    home = os.path.expanduser("~")
    assert node_data_root(None) == node_data_root(DEFAULT_DATA_ROOT) == os.path.join(home, ".cache/haqtune/data")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "big-disk"))
    assert node_data_root(DEFAULT_DATA_ROOT) == str(tmp_path / "big-disk")  # the node's own choice
    assert node_data_root(str(tmp_path / "nfs")) == str(tmp_path / "nfs")  # explicit: used as given
    # The default stays "~..." in a search's resolved config (expanded by each node), an
    # explicit relative root becomes absolute (the driver's), as before.
    config = SearchConfig()
    assert config.data_root == DEFAULT_DATA_ROOT
    assert config.resolved(tracking_uri="sqlite:///x.db").data_root == DEFAULT_DATA_ROOT
    monkeypatch.chdir(tmp_path)
    assert SearchConfig(data_root="data").resolved(tracking_uri="sqlite:///x.db").data_root == str(tmp_path / "data")


PREPARE_SCRIPT = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("node", sys.argv[1])
    node = importlib.util.module_from_spec(spec); spec.loader.exec_module(node)
    root, log = sys.argv[2], sys.argv[3]

    def prepare(download):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {download}\\n")
        if download:  # a slow download: the other process must wait for it, not start its own
            time.sleep(1.0)
            with open(os.path.join(root, "data.bin"), "w") as f:
                f.write("complete")
        with open(os.path.join(root, "data.bin")) as f:
            assert f.read() == "complete", "read a half-prepared dataset"
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {download}\\n")
        return download

    print(node.prepare_once(root, "toy", prepare))
""")


def test_two_processes_prepare_a_dataset_once(tmp_path):
    root, log = tmp_path / "data", tmp_path / "log.txt"
    # The node module is loaded on its own (no torch import), so both start within ms.
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT, str(NODE_PY), str(root), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(out for out, _ in outs) == ["(False, False)\n", "(True, True)\n"]
    lines = log.read_text().splitlines()
    # One download, and the other process started only after it ended.
    assert [line.split()[0] + line.split()[2] for line in lines] == ["startTrue", "endTrue", "startFalse", "endFalse"]
    assert (root / ".toy.ready").exists()
    # Later callers find the marker and never download.
    spec_out = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, str(NODE_PY), str(root), str(log)],
                              capture_output=True, text=True, timeout=60)
    assert spec_out.stdout == "(False, False)\n"


def test_a_failed_preparation_leaves_no_marker(tmp_path):
    from trainables.node import prepare_once

    def broken(download):
        raise OSError("network down")

    with pytest.raises(OSError, match="network down"):
        prepare_once(str(tmp_path), "toy", broken)
    assert not (tmp_path / ".toy.ready").exists()
    assert prepare_once(str(tmp_path), "toy", lambda download: download) == (True, True)


def test_missing_imagefolder_root_names_the_node(tmp_path):
    label = node_label()
    assert label == f"{node_info()['hostname']} ({node_info()['ip']})"
    for load in (lambda: load_dataset("imagefolder", root=str(tmp_path / "nope")),
                 lambda: dataset_facts("imagefolder", root=str(tmp_path / "nope"))):
        with pytest.raises(FileNotFoundError) as info:
            load()
        assert f"on node {label}" in str(info.value) and "train/<class>" in str(info.value)


# ---- progress lines --------------------------------------------------------------------


def test_progress_lines_are_throttled_and_end_with_the_total():
    now = [100.0]
    lines: list[str] = []
    progress = ProgressLine("reference training", 20, "epochs", lines.append, interval_s=10,
                            clock=lambda: now[0])
    for epoch in range(1, 21):
        now[0] += 1.5  # 1.5 s per epoch
        progress.update(epoch)
    assert format_progress("final evaluation", 2, 3, "checkpoints", 7.4) == \
        "haqtune: final evaluation: 2/3 checkpoints, 7 s"
    # The first update, then one line per 10 s at most, and the last.
    assert lines == ["haqtune: reference training: 1/20 epochs, 2 s",
                     "haqtune: reference training: 8/20 epochs, 12 s",
                     "haqtune: reference training: 15/20 epochs, 22 s",
                     "haqtune: reference training: 20/20 epochs, 30 s"]
    ProgressLine("x", 1, "y", None).update(1)  # no printer: silent


# ---- the reference cache (driver side) -------------------------------------------------


def test_reference_cache_round_trip_and_key_check(tmp_path):
    cache = ReferenceCache(tmp_path / "_cache")
    assert cache.names() == frozenset()  # no directory yet
    payload = {"model": "demo", "data_fingerprint": "abc", "seed": 0}
    name = reference_cache_name(payload)
    state = {"w": torch.arange(3.0)}
    cache.write(name, payload, state, 0.75)
    assert cache.names() == {name}
    got_state, acc = cache.read(name, payload)
    assert acc == 0.75 and torch.equal(got_state["w"], state["w"])
    # Another key under this file name (a hash collision) is not taken for this one.
    assert cache.read(name, {**payload, "data_fingerprint": "changed"}) is None
    assert reference_cache_name({**payload, "data_fingerprint": "changed"}) != name


# ---- the sensitivity oracle's batches --------------------------------------------------


class _Context:
    layer_names = ("a", "b", "c")


def test_oracle_evaluates_uncached_points_as_one_batch():
    batches: list[list] = []

    def runner(context, points, calibration_samples):
        batches.append(list(points))
        return [0.5 if p[0] is None else 0.5 - 0.01 * p[0] - 0.001 * p[1] for p in points]

    oracle = SensitivityOracle(_Context(), runner=runner)
    assert oracle(None, 8, 8) == 0.5
    got = oracle.evaluate_many([(1, 4, 8), (None, 3, 3), (1, 4, 8), (2, 8, 2)])
    assert got == [0.5 - 0.01 - 0.004, 0.5, 0.5 - 0.01 - 0.004, 0.5 - 0.02 - 0.008]
    # The reference point is cached whatever its bits; duplicates are evaluated once.
    assert batches == [[(None, 0, 0)], [(1, 4, 8), (2, 8, 2)]]
    assert oracle.evaluations == 3
    assert oracle.evaluate_many([(2, 8, 2)]) == [got[3]] and len(batches) == 2
    with pytest.raises(ValueError, match="expected an index in"):
        oracle(3, 8, 8)


def test_sensitivity_measurement_is_one_batch():
    seen: list[int] = []

    class BatchOracle:
        def evaluate_many(self, points):
            seen.append(len(points))
            return [0.9 if layer is None else 0.9 - 0.01 * (8 - min(w, a)) for layer, w, a in points]

        def __call__(self, *point):  # pragma: no cover - must not be used when batches exist
            raise AssertionError("called point by point")

    allowed = AllowedBits.full(2, 1, 8)
    acc_ref, dw, da = measure_sensitivity(BatchOracle(), allowed, 8)
    assert seen == [1 + 2 * 2 * 7] and acc_ref == 0.9
    assert dw[0, 3] == pytest.approx(0.04) and da[1, 0] == pytest.approx(0.07) and dw[0, 7] == 0


def test_remote_runner_pickles_without_its_printer():
    runner = RemoteSensitivityRunner(cpus=1, gpus=1, workers=4, echo=print)
    restored = pickle.loads(pickle.dumps(runner))
    assert restored.echo is None and (restored.cpus, restored.gpus, restored.workers) == (1, 1, 4)


# ---- node tags on trial runs -----------------------------------------------------------


def test_trial_runs_are_tagged_with_their_node(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = empty_store(tmp_path_factory, tmp_path / "mlflow.db")
    tracker = make_tracker(uri, tmp_path / "runs" / "random-s1")
    tracker.start()
    play(tracker, "t_00000", [0.9])
    trial = play(tracker, "t_00001", [0.8], complete=False)
    # A retried trial reports from another node: the last node wins.
    for node, node_id in (("hostA (10.0.0.1)", "aaaa"), ("hostB (10.0.0.2)", "bbbb")):
        trial.last_result = {**report(0.85, 1, final=True), M.NODE: node, M.NODE_ID: node_id}
        tracker.on_trial_result(0, [], trial, trial.last_result)
    tracker.on_trial_complete(0, [], trial)
    tracker.end()
    _, _, children = runs(uri)
    assert children["t_00001"].data.tags["haqtune.node"] == "hostB (10.0.0.2)"
    assert children["t_00001"].data.tags["haqtune.node_id"] == "bbbb"
    assert "haqtune.node" not in children["t_00000"].data.tags  # reports without a node: no tag
