"""Resume and fault handling, the fast parts: self-contained search directories, the
store check before a resume, the restorable callbacks, interrupt handling, the trial
checkpoint format, the fault-injection hook and the ranking of finished trials."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tracking import empty_store, make_tracker, play

from orchestrator import callbacks as cb
from orchestrator.config import SearchConfig
from orchestrator.errors import HaqtuneError
from orchestrator.search import prepare
from orchestrator.tracking import RUN_MAP_FILE, absolute_tracking_uri, check_search_runs
from search_spaces import metrics as M

# ---- a search directory is self-contained --------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///mlflow.db", "sqlite:////work/dir/mlflow.db"),
    ("sqlite:///sub/../store.db", "sqlite:////work/dir/store.db"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("mlruns", "/work/dir/mlruns"),
    ("file:mlruns", "file:///work/dir/mlruns"),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
])
def test_absolute_tracking_uri(uri, expected):
    assert absolute_tracking_uri(uri, "/work/dir") == expected


def test_resolved_config_is_absolute_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(storage_dir="runs", data_root="data", searcher="tpe", num_trials=7)
    resolved = config.resolved(tracking_uri=absolute_tracking_uri("sqlite:///mlflow.db"))
    assert resolved.storage_dir == str(tmp_path / "runs") and resolved.data_root == str(tmp_path / "data")
    assert resolved.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    resolved.write_yaml(tmp_path / "config.yaml")
    # config.yaml is what `haqtune search CONFIG` reads: the same search, from anywhere.
    monkeypatch.chdir("/")
    again = SearchConfig.from_yaml(tmp_path / "config.yaml")
    assert again == resolved
    assert prepare(again).config == resolved


def test_default_searcher_is_haq():
    assert SearchConfig().searcher == "haq"
    assert SearchConfig.from_yaml(Path(__file__).parents[1] / "configs" / "demo.yaml") == SearchConfig.demo()


def test_resume_check_refuses_a_store_without_the_runs(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = empty_store(tmp_path_factory, tmp_path / "mlflow.db")
    search_dir = tmp_path / "search"
    tracker = make_tracker(store, search_dir, search_id="s1")
    tracker.start()
    play(tracker, "t_00000", [0.7])
    tracker.end("KILLED")
    mapping = search_dir / RUN_MAP_FILE
    check_search_runs(store, mapping, search_id="s1")  # the right store: fine

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HaqtuneError, match="no MLflow store at .*--tracking-uri"):
        check_search_runs(f"sqlite:///{tmp_path / 'elsewhere.db'}", mapping, search_id="s1")
    other = empty_store(tmp_path_factory, tmp_path / "other.db")
    with pytest.raises(HaqtuneError, match=r"does not hold search s1's runs \(2 of 2 missing"):
        check_search_runs(other, mapping, search_id="s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "other.db"])  # nothing created
    # A moved store holding the same runs is accepted.
    (tmp_path / "moved.db").write_bytes((tmp_path / "mlflow.db").read_bytes())
    check_search_runs(f"sqlite:///{tmp_path / 'moved.db'}", mapping, search_id="s1")


def test_resume_plan_rejects_finished_and_foreign_directories(tmp_path):
    from orchestrator.search import resume_plan

    search_dir = tmp_path / "s"
    search_dir.mkdir()
    with pytest.raises(HaqtuneError, match="not a haqtune search directory"):
        resume_plan(search_dir)
    SearchConfig().write_yaml(search_dir / "config.yaml")
    (search_dir / "tuner.pkl").write_bytes(b"")
    (search_dir / "summary.json").write_text("{}")
    with pytest.raises(HaqtuneError, match="already finished"):
        resume_plan(search_dir)


# ---- callbacks that survive Tuner.restore ---------------------------------------------


class Recorder(cb.Callback):
    def __init__(self):
        self.calls = []

    def setup(self, **info):
        self.calls.append(("setup", info))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.calls.append(("complete", trial))


def test_driver_callbacks_pickle_to_their_id_and_forward_to_this_drivers_callbacks():
    proxy = cb.DriverCallbacks("search-x")
    blob = pickle.dumps(proxy)
    assert len(blob) < 200  # nothing of the first driver's state travels in tuner.pkl
    restored = pickle.loads(blob)
    restored.on_trial_complete(0, [], "trial")  # nothing registered: a no-op
    rec = Recorder()
    cb.register("search-x", [rec])
    try:
        restored.setup(stop=None)
        restored.on_trial_complete(1, [], "trial-a")
        restored.on_trial_result(1, [], "trial-a", {})  # not implemented by Recorder: base no-op
    finally:
        cb.unregister("search-x")
    restored.on_trial_complete(2, [], "trial-b")
    assert rec.calls == [("setup", {"stop": None}), ("complete", "trial-a")]


def test_interrupts_record_sigint_and_sigterm_and_call_the_inner_handler():
    seen = []
    previous_int, previous_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts = cb.Interrupts()
    interrupts.arm()
    signal.signal(signal.SIGINT, lambda s, f: seen.append(s))  # stands for Ray Tune's handler
    try:
        interrupts.setup()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    finally:
        interrupts.disarm()
    assert interrupts.signal == signal.SIGTERM
    assert seen == [signal.SIGINT, signal.SIGINT]  # SIGTERM takes the graceful SIGINT path
    assert signal.getsignal(signal.SIGINT) is previous_int
    assert signal.getsignal(signal.SIGTERM) is previous_term


# ---- checkpoints and ranking -----------------------------------------------------------


def test_quantized_checkpoint_round_trip(tmp_path):
    from trainables import TrialContext, build_model, load_quantized_checkpoint
    from trainables.quantize import quantize_model
    from trainables.trial import save_quantized_checkpoint

    prepared = prepare(SearchConfig())
    built = build_model("demo", seed=0, **prepared.model_kwargs)
    context = TrialContext(
        model="demo", dataset="digits", model_kwargs=prepared.model_kwargs, input_size=None,
        layer_names=tuple(s.name for s in prepared.layers), reference_state=built.model.state_dict(),
        ref_acc=0.9, table=prepared.table, budget=None, finetune=SearchConfig().finetune, seed=0)
    n = len(context.layer_names)
    policy = np.stack([1 + np.arange(n) % 8, 8 - np.arange(n) % 8], axis=1)  # every bit width
    x = torch.randn(16, *built.input_shape, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_model(built.model, context.layer_names, policy, x.abs())  # unsigned inputs somewhere
    with torch.no_grad():  # as if fine-tuned: weights moved away from the reference
        for p in qmodel.parameters():
            p.add_(0.01)
    qmodel.eval()
    save_quantized_checkpoint(tmp_path, qmodel, context=context, policy=policy, metrics={M.VAL_ACC: 0.5})
    loaded, saved = load_quantized_checkpoint(tmp_path)
    assert saved["policy"] == policy.tolist() and saved["metrics"] == {M.VAL_ACC: 0.5}
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    torch.save({"format": "other"}, tmp_path / "quantized_model.pt")
    with pytest.raises(ValueError, match="expected a haqtune.quantized/1 checkpoint"):
        load_quantized_checkpoint(tmp_path)


def test_ranking_only_finished_trials_one_per_policy():
    rows = [
        {"trial_id": "a", "status": "FINISHED", M.VAL_ACC: 0.90, M.POLICY: "p1"},
        {"trial_id": "b", "status": "KILLED", M.VAL_ACC: 0.99, M.POLICY: "p2"},  # ASHA-stopped
        {"trial_id": "c", "status": "FAILED", M.VAL_ACC: None, M.POLICY: None},
        {"trial_id": "d", "status": "FINISHED", M.VAL_ACC: 0.95, M.POLICY: "p1"},  # same policy
        {"trial_id": "e", "status": "FINISHED", M.VAL_ACC: 0.90, M.POLICY: "p3"},  # tie: later
        {"trial_id": "f", "status": "FINISHED", M.VAL_ACC: 0.80, M.POLICY: "p4"},
    ]
    assert [r["trial_id"] for r in cb.ranked_trials(rows, 3)] == ["d", "e", "f"]
    assert [r["trial_id"] for r in cb.ranked_trials(rows, 1)] == ["d"]
    assert cb.ranked_trials(rows, 0) == []


# ---- the fault-injection testing hook ----------------------------------------------------


def test_parse_faults():
    from trainables.trial import parse_faults

    assert parse_faults(None) == {} and parse_faults("") == {}
    assert parse_faults("raise@1, nan@2,kill@3:1") == {1: ("raise", None), 2: ("nan", None), 3: ("kill", 1)}
    with pytest.raises(ValueError, match="choose a kind"):
        parse_faults("explode@1")
    with pytest.raises(ValueError, match="KIND@INDEX"):
        parse_faults("raise@x")


def test_trial_numbers_are_claimed_once_in_start_order(tmp_path):
    from trainables.trial import _trial_number

    assert [_trial_number(tmp_path, t) for t in ("a", "b", "a", "c", "b")] == [1, 2, 1, 3, 2]
    assert sorted(os.listdir(tmp_path)) == ["id-a", "id-b", "id-c", "number-1", "number-2", "number-3"]


# ---- Ray's helpers die with a SIGKILLed driver ---------------------------------------------


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc (Linux)")
def test_reaper_kills_what_a_sigkilled_driver_started(tmp_path):
    import subprocess
    import sys
    import time

    import orchestrator

    reaper = Path(orchestrator.__file__).with_name("_reaper.py")
    # A driver that starts a helper in its own session (as Ray's agents end up: orphaned,
    # outside the driver's process group) and the reaper, then waits to be killed.
    driver_code = (
        "import subprocess, sys, time\n"
        "helper = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"subprocess.Popen([sys.executable, {str(reaper)!r}, str(__import__('os').getpid())],"
        " start_new_session=True)\n"
        "print(helper.pid, flush=True)\n"
        "time.sleep(300)\n")
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True)
    helper = int(driver.stdout.readline())
    time.sleep(2.5)  # the reaper's first scans
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while time.time() < deadline and Path(f"/proc/{helper}").exists() and \
            Path(f"/proc/{helper}/stat").read_text().split()[2] != "Z":
        time.sleep(0.2)
    alive = Path(f"/proc/{helper}").exists() and Path(f"/proc/{helper}/stat").read_text().split()[2] != "Z"
    if alive:
        os.kill(helper, signal.SIGKILL)
    assert not alive, "the driver's helper outlived it"


class _Trial:
    def __init__(self, trial_id, acc, policy, checkpoint, status="TERMINATED"):
        self.trial_id, self.status, self.checkpoint = trial_id, status, checkpoint
        self.last_result = {M.VAL_ACC: acc, M.POLICY: policy, M.DONE: 1}


def test_checkpoint_keeper_deletes_outside_the_top_k_only_once_the_state_is_saved(tmp_path):
    from ray.tune import Checkpoint

    def checkpoint(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "quantized_model.pt").write_bytes(b"x")
        return Checkpoint.from_directory(str(tmp_path / name))

    old = _Trial("old", 0.5, "p0", checkpoint("old"))  # finished in an earlier driver: saved
    a = _Trial("a", 0.7, "p1", checkpoint("a"), status="RUNNING")
    b = _Trial("b", 0.9, "p2", checkpoint("b"), status="RUNNING")
    trials = [old, a, b]
    keeper = cb.CheckpointKeeper(top_k=1)
    keeper.on_trial_complete(3, trials, a)  # a is best so far; old is out and safe
    assert not (tmp_path / "old").exists() and (tmp_path / "a").exists()
    a.status = "TERMINATED"
    keeper.on_trial_complete(5, trials, b)  # a drops out, but the saved state has it running
    b.status = "TERMINATED"
    keeper.on_step_begin(6, trials)
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()
    keeper.on_checkpoint(4, trials, b, None)  # a save at the end of step 4: a (completed at 3) is safe
    keeper.on_step_begin(7, trials)
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
