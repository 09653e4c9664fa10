"""Active learning: leases on handed-out images, the uncertainty score and strategy, and both through a server."""

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.activelearning.first import First

from sam3d.monailabel import load_app_config
from sam3d.monailabel.activelearning import (
    RandomStrategy,
    ScoreCache,
    UncertaintyScoring,
    UncertaintyStrategy,
    checkpoint_stamp,
    disagreement,
    propose_points,
)
from sam3d.monailabel.leases import LeasedStrategy, LeaseStore
from tiny_datastore import volume, write_label, write_studies, write_tiny_model

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_leases_expire_move_with_the_client_and_survive_a_restart(tmp_path):
    clock = Clock()
    store = LeaseStore(tmp_path / "leases.json", minutes=1, clock=clock)
    store.acquire("a", "alice")
    store.acquire("b", "bob")
    assert store.held_by_others("alice") == {"b"} and store.held_by_others("carol") == {"a", "b"}
    store.acquire("c", "alice")  # alice moved on: her lease on a ends
    assert set(LeaseStore(tmp_path / "leases.json", 1, clock).live()) == {"b", "c"}  # read back from the file
    assert store.release("c") and not store.release("c")
    clock.now += 61
    assert store.live() == {} and store.held_by_others("carol") == set()


def test_leased_first_never_hands_one_image_to_two_clients(tmp_path):
    write_studies(tmp_path, 4, labelled=(0,))
    ds = LocalDatastore(str(tmp_path))
    first = LeasedStrategy(First(), LeaseStore(tmp_path / ".sam3d" / "leases.json", 30))
    got = [first({"strategy": "first", "client_id": c}, ds)["id"] for c in ("a", "b", "c")]
    assert got == ["img1", "img2", "img3"]
    assert first({"strategy": "first", "client_id": "d"}, ds) is None  # everything unlabelled is leased
    assert first({"strategy": "first", "client_id": "a"}, ds)["id"] == "img1"  # its own lease does not hide it
    # MONAI Label's random fails when every candidate was handed out this second; ours does not
    for image in ("img1", "img2", "img3"):
        ds.update_image_info(image, {"strategy": {"random": {"ts": int(time.time()) + 5}}})
    assert RandomStrategy()({"strategy": "random"}, ds)["id"] in ("img1", "img2", "img3")


def test_proposed_points_and_disagreement():
    image, label = volume(0)
    pts = propose_points(image, 3, seed=1)
    assert pts == propose_points(image, 3, seed=1) and len(pts) == 3
    assert all(image[tuple(p)] > np.percentile(image, 75) for p in pts)
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    assert disagreement([a, a, a]) == 0.0 and disagreement([a, ~a]) == 1.0
    assert disagreement([np.zeros_like(a)] * 2) == 0.0


def _spec(tmp_path):
    config, ckpt = write_tiny_model(tmp_path / "models")
    return load_app_config({"model": str(config)}, REPO / "configs").infers["sam3d_point"], ckpt


def test_scores_are_cached_per_checkpoint_and_rank_the_images(tmp_path):
    ids = write_studies(tmp_path / "studies", 3, labelled=(0,))
    ds = LocalDatastore(str(tmp_path / "studies"))
    spec, ckpt = _spec(tmp_path)
    cache = ScoreCache(tmp_path / "scores.json")
    out = UncertaintyScoring(spec, cache, {"points": 2, "repeats": 3}, "cpu")({}, ds)
    stamp = checkpoint_stamp(spec)
    assert out["scored"] == 2 and set(cache.scores(stamp)) == {"img1", "img2"}
    assert all(0.0 <= v <= 1.0 for v in cache.scores(stamp).values())
    assert UncertaintyScoring(spec, cache, {}, "cpu")({}, ds)["scored"] == 0  # cached: nothing to do

    started = []
    strategy = UncertaintyStrategy(spec, cache, lambda: started.append(1))
    best = max(cache.scores(stamp), key=cache.scores(stamp).get)
    assert strategy({}, ds)["id"] == best and not started
    st = ckpt.stat()  # the checkpoint changes (a training promoted one): the scores are stale
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoint_stamp(spec) != stamp and cache.scores(checkpoint_stamp(spec)) == {}
    pick = strategy({}, ds)
    assert pick["id"] in ids[1:] and pick["score"] is None and started == [1]


# ---- through a real server --------------------------------------------------------------------------------------


def _get(url, path):
    with urllib.request.urlopen(f"{url}{path}") as r:
        return json.load(r)


@pytest.mark.slow
def test_strategies_through_the_server(tmp_path):
    from monailabel_server import log_tail, running_server

    studies = tmp_path / "studies"
    write_studies(studies, 5, labelled=(0,))
    config, _ = write_tiny_model(tmp_path / "models")
    (tmp_path / "client").mkdir()
    conf = [("model", config), ("device", "cpu"), ("uncertainty.points", 2), ("uncertainty.repeats", 3)]
    with running_server(tmp_path, studies, conf) as (url, proc, log):

        def client(name):
            return MONAILabelClient(url, tmpdir=str(tmp_path / "client"), client_id=name)

        def next_id(name, strategy="first"):
            return client(name).next_sample(strategy, {}).get("id")

        assert set(client("x").info()["strategies"]) >= {"random", "first", "uncertainty"}
        assert next_id("a") == "img1" and next_id("b") == "img2"  # b does not get a's image
        leases = yaml.safe_load((studies / ".sam3d" / "leases.json").read_text())
        assert {k: v["client"] for k, v in leases.items()} == {"img1": "a", "img2": "b"}

        client("a").save_label("img1", str(write_label(volume(1)[1], tmp_path / "l1.nii.gz")))
        assert "img1" not in yaml.safe_load((studies / ".sam3d" / "leases.json").read_text())
        assert next_id("c") == "img3" and next_id("d", "random") == "img4"
        assert next_id("e") is None  # every unlabelled image is leased: nothing to hand out

        # nothing scored yet: uncertainty answers at random and starts the scoring job in the background
        assert not (studies / ".sam3d" / "uncertainty.json").exists()
        assert next_id("s", "uncertainty") is None  # every unlabelled image is leased, yet the job starts
        deadline = time.monotonic() + 300
        while (job := _get(url, "/scoring/"))["status"] in ("SUBMITTED", "RUNNING"):
            assert time.monotonic() < deadline, log_tail(log)
            time.sleep(0.5)
        assert job["status"] == "DONE" and job["request"]["method"] == "uncertainty"
        scores = json.loads((studies / ".sam3d" / "uncertainty.json").read_text())["scores"]
        assert set(scores) == {"img2", "img3", "img4"}  # img0 and img1 are labelled
        leases = json.loads((studies / ".sam3d" / "leases.json").read_text())
        for lease in leases.values():
            lease["expires"] = 0  # every lease has expired: all images are free again
        (studies / ".sam3d" / "leases.json").write_text(json.dumps(leases))
        best = max(scores, key=scores.get)
        got = client("f").next_sample("uncertainty", {})
        assert got["id"] == best and got["score"] == pytest.approx(scores[best])
        assert next_id("g", "uncertainty") in set(scores) - {best}
        for _ in range(5):
            assert next_id("h", "random") not in ("img0", "img1")
        assert proc.poll() is None
