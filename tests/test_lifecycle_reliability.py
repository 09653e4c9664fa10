"""Task processes die with their server and never promote under another one; scoring skips what it cannot score.

The fast tests run a task process's watchdog under a stand-in server, a training run in-process under a server
that is gone or replaced, and the scoring with a model without weights or an image that fails. The reliability
tests (real servers) kill -9 a server during training, and start one without point weights.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore

from sam3d.engine.checkpoint import file_sha256, load_model
from sam3d.monailabel import Sam3DTrainTask, lifecycle, load_app_config
from sam3d.monailabel.activelearning import ScoreCache, UncertaintyScoring, UncertaintyStrategy, checkpoint_stamp
from sam3d.monailabel.promotion import previous_path
from test_train_task import QUICK, _finished, _rows, _wait
from tiny_datastore import write_studies, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
LIB = str(REPO / "lib")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_task_process(pid: int) -> None:
    """Clean-up after a failed test: a task process the test started (through its server), and only that."""
    try:
        p = psutil.Process(pid)
        command = " ".join(p.cmdline())
        if "monailabel.interfaces.utils.app" in command or "exit_with_server" in command:
            p.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


# ---- the watchdog --------------------------------------------------------------------------------------------------

WATCHED_TASK = "from sam3d.monailabel import lifecycle; import time; lifecycle.exit_with_server(); time.sleep(600)"


def test_a_task_process_exits_when_its_server_dies(tmp_path):
    server = textwrap.dedent(f"""
        import os, subprocess, sys, time
        os.environ["{lifecycle.ENV}"] = f"{{os.getpid()}}:stand-in"
        task = subprocess.Popen([sys.executable, "-c", {WATCHED_TASK!r}])
        print(task.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": LIB}
    )
    task_pid = int(proc.stdout.readline())
    try:
        assert not gone(task_pid)
        proc.kill()  # kill -9: no clean-up of its own
        proc.wait()
        _wait("the task process to exit", lambda: gone(task_pid), timeout_s=60)
    finally:
        proc.kill()
        kill_task_process(task_pid)


def test_a_task_process_whose_server_is_already_gone_exits_at_once():
    env = {**os.environ, "PYTHONPATH": LIB, lifecycle.ENV: f"{os.getppid()}:gone"}  # not the task's parent
    done = subprocess.run([sys.executable, "-c", WATCHED_TASK], env=env, timeout=300)
    assert done.returncode == 1


# ---- promotion only under the server that started the run ----------------------------------------------------------


def test_a_run_promotes_only_under_the_server_that_started_it(tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    write_studies(studies, 3, labelled=(0, 1))
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    c = load_app_config({"model": str(model_yaml), **QUICK}, REPO / "configs")
    state = studies / ".sam3d"
    task = Sam3DTrainTask(c.infers["sam3d_point"], c.train, state, c.root)
    ds = LocalDatastore(str(studies))
    served = file_sha256(ckpt)

    # this test's parent plays the server that started the run; another server registered since
    monkeypatch.setenv(lifecycle.ENV, f"{os.getppid()}:started-it")
    (state / "server.json").parent.mkdir(parents=True)
    (state / "server.json").write_text(json.dumps({"pid": 1234, "id": "another"}))
    refused = task({"steps": 1, "promote": "always", "val_split": 0.5}, ds)
    assert not refused["promoted"] and "another server (pid 1234) serves this datastore now" in refused["reason"]
    assert refused["server"] == {"pid": os.getppid(), "id": "started-it"}
    assert file_sha256(ckpt) == served and not previous_path(ckpt).exists()

    monkeypatch.setenv(lifecycle.ENV, f"{os.getppid() + 100000}:started-it")  # not the parent: it stopped
    assert "has stopped" in lifecycle.why_not_serving(state)

    (state / "server.json").write_text(json.dumps({"pid": os.getppid(), "id": "started-it"}))
    monkeypatch.setenv(lifecycle.ENV, f"{os.getppid()}:started-it")
    assert task({"steps": 1, "promote": "always", "val_split": 0.5}, ds)["promoted"]
    assert file_sha256(ckpt) != served


# ---- scoring what can be scored, once -----------------------------------------------------------------------------


def _scoring_setup(tmp_path):
    studies = tmp_path / "studies"
    write_studies(studies, 3, labelled=(0,))
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    spec = load_app_config({"model": str(model_yaml)}, REPO / "configs").infers["sam3d_point"]
    return spec, ckpt, LocalDatastore(str(studies)), ScoreCache(tmp_path / "scores.json")


def test_no_weights_no_scoring_one_line(tmp_path, caplog):
    spec, ckpt, ds, cache = _scoring_setup(tmp_path)
    ckpt.unlink()

    def no_engine(*_):
        raise AssertionError("no model is built without weights")

    with caplog.at_level(logging.INFO, logger="sam3d.monailabel.activelearning"):
        out = UncertaintyScoring(spec, cache, {}, "cpu", engine_factory=no_engine)({}, ds)
    assert out["scored"] == 0 and "not found" in out["skipped"]
    assert [r.levelno for r in caplog.records] == [logging.INFO] and not any(r.exc_info for r in caplog.records)
    started = []
    pick = UncertaintyStrategy(spec, cache, lambda: started.append(1))({}, ds)
    assert pick["id"] in ("img1", "img2") and pick["score"] is None and not started


class OneBadImage:
    """An engine whose masks are a fixed block, and which fails on img1."""

    def __init__(self):
        self.images = []

    def segment(self, image, points, labels, label):
        self.images.append(Path(image).name)
        if Path(image).name.startswith("img1"):
            raise RuntimeError("cannot read this volume")
        mask = np.zeros((28, 26, 24), np.uint8)
        mask[5:15, 5:15, 5:15] = 1
        return SimpleNamespace(mask=mask)


def test_an_image_that_cannot_be_scored_is_not_tried_again(tmp_path):
    spec, _, ds, cache = _scoring_setup(tmp_path)
    engine = OneBadImage()
    scoring = UncertaintyScoring(spec, cache, {"points": 1, "repeats": 2}, "cpu", engine_factory=lambda *_: engine)
    assert scoring({}, ds)["scored"] == 1
    stamp = checkpoint_stamp(spec)
    assert set(cache.scores(stamp)) == {"img2"} and "cannot read" in cache.unscorable(stamp)["img1"]
    tried = len(engine.images)
    assert scoring({}, ds)["scored"] == 0 and len(engine.images) == tried  # nothing re-run
    started = []
    assert UncertaintyStrategy(spec, cache, lambda: started.append(1))({}, ds)["id"] == "img2" and not started


# ---- through real servers (reliability suite) ----------------------------------------------------------------------


@pytest.mark.reliability
def test_kill_9_during_training_leaves_no_process_and_a_consistent_datastore(tmp_path):
    from monailabel_server import log_tail, running_server

    studies = tmp_path / "studies"
    write_studies(studies, 3, labelled=(0, 1))
    labels_before = {p.name: file_sha256(p) for p in (studies / "labels" / "final").glob("*.nii.gz")}
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    served = file_sha256(ckpt)
    conf = [("model", model_yaml), ("device", "cpu"), *QUICK.items()]
    runs = studies / ".sam3d" / "train"
    (tmp_path / "client").mkdir()

    with running_server(tmp_path, studies, conf) as (url, proc, log):
        MONAILabelClient(url, tmpdir=str(tmp_path / "client")).train_start(
            "sam3d", {"steps": 100000, "promote": "always"}
        )
        run = _wait("the first training step", lambda: next((r for r in runs.glob("*") if _rows(r)), None))
        task_pid = json.loads((run / "run.json").read_text())["pid"]
        try:
            assert not gone(task_pid) and psutil.Process(task_pid).ppid() == proc.pid, log_tail(log)
            proc.kill()  # kill -9 of the server
            proc.wait()
            _wait("the training process to exit", lambda: gone(task_pid), timeout_s=60)
        finally:
            kill_task_process(task_pid)

    with running_server(tmp_path, studies, conf) as (url, proc, log):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        stats = client.info()["train_stats"]["sam3d"]
        assert stats["run"] == str(run) and stats["status"] == "stopped" and stats["served_sha256"] == served
        assert file_sha256(ckpt) == served and not previous_path(ckpt).exists()
        assert not list(ckpt.parent.glob(".*.tmp")) and load_model({"checkpoint": str(ckpt)}).model.img_size == 32
        assert labels_before == {p.name: file_sha256(p) for p in (studies / "labels" / "final").glob("*.nii.gz")}
        assert set(client.datastore()["objects"]) == {"img0", "img1", "img2"}

        # the new server trains and promotes: the killed run held nothing it still needs
        task = client.train_start("sam3d", {"steps": 2, "promote": "always"})
        assert _wait("the new run", lambda: _finished(client, task["id"]))["status"] == "DONE", log_tail(log)
        assert file_sha256(ckpt) != served and client.info()["train_stats"]["sam3d"]["promoted"]


@pytest.mark.reliability
def test_a_server_without_point_weights_scores_nothing_and_says_so_once(tmp_path):
    from test_security_reliability import http, log_tail, started_server

    studies = tmp_path / "studies"
    write_studies(studies, 3, labelled=(0,))
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    away = ckpt.rename(ckpt.with_suffix(".away"))
    conf = [("model", model_yaml), ("device", "cpu")]
    with started_server(tmp_path, studies, conf) as (url, proc, log):  # MONAI Label's automatic scoring is on
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        for strategy in ("uncertainty", "uncertainty", "random"):
            assert client.next_sample(strategy, {}).get("id")
        assert http(url, "/scoring/")[0] == 404  # no scoring job ever started
        text = log.read_text()
        assert text.count("sam3d uncertainty: off (task sam3d_point has no weights") == 1
        assert "Traceback" not in text

        away.rename(ckpt)  # the weights arrive: uncertainty scores again
        client.next_sample("uncertainty", {})

        def finished_job():
            status, _, body = http(url, "/scoring/")
            job = json.loads(body) if status == 200 else None
            return job if job and job["status"] not in ("SUBMITTED", "RUNNING") else None

        assert _wait("the scoring job", finished_job)["status"] == "DONE", log_tail(log)
        scores = json.loads((studies / ".sam3d" / "uncertainty.json").read_text())["scores"]
        assert set(scores) == {"img1", "img2"} and proc.poll() is None
