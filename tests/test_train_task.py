"""The train task `sam3d`: parameters, split, promotion, a run in-process, and the whole loop through a real server.

The model is the smoke recipe's tiny network with random weights written by the test; the datastore holds small
synthetic volumes (tests/tiny_datastore.py), so a run takes seconds on one CPU thread.
"""

import functools
import json
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel.datastore.local import LocalDatastore
from safetensors.torch import load_file

from monailabel_server import wait_for
from sam3d.engine.checkpoint import file_sha256, load_model, read_state_dict
from sam3d.monailabel import Sam3DTrainTask, TrainRequestError, load_app_config
from sam3d.monailabel.promotion import previous_path, promote, should_promote
from sam3d.monailabel.retrain import RetrainPolicy
from sam3d.monailabel.train_params import DEFAULTS, parse_train_params, resolve_auto
from sam3d.monailabel.train_runs import split_ids
from test_server import HttpError
from tiny_datastore import volume, write_label, write_studies, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train.val_samples": "2", "train.val_clicks": "2"}  # held-out validation of a few windows
SETTINGS = resolve_auto(DEFAULTS, {})  # the defaults for a model config without finetune_defaults


def _task(tmp_path, conf=None, labelled=(0, 1)) -> tuple[Sam3DTrainTask, LocalDatastore, Path]:
    studies = tmp_path / "studies"
    write_studies(studies, 3, labelled)
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    c = load_app_config({"model": str(model_yaml), **QUICK, **(conf or {})}, REPO / "configs")
    task = Sam3DTrainTask(c.infers["sam3d_point"], c.train, studies / ".sam3d", c.root)
    return task, LocalDatastore(str(studies)), ckpt


@pytest.mark.parametrize(
    "params, message",
    [
        ({"trainable": "encoder"}, "unknown trainable part"),
        ({"epochs": -1}, "epochs must be >= 0"),
        ({"epochs": 0, "steps": 0}, "nothing to train"),
        ({"epochs": 1.5}, "epochs must be an integer"),
        ({"lr": 0}, "lr must be > 0"),
        ({"val_split": 1}, "val_split must be in [0, 1)"),
        ({"promote": "maybe"}, "unknown promote policy"),
        ({"device": "tpu"}, "unknown device"),
        ({"labels": ["liver", "brian"]}, "unknown label names ['brian']"),
    ],
)
def test_bad_parameters_are_refused_with_the_reason(params, message):
    with pytest.raises(TrainRequestError) as e:
        parse_train_params(params, SETTINGS, {"liver": 5, "brain": 90})
    assert message in str(e.value) and e.value.status == 422


def test_parameters_defaults_aliases_and_choice_lists():
    p = parse_train_params(
        {"learning_rate": "3e-4", "trainable": ["decoder", "all"], "steps": 7, "client_id": "x"},
        {**SETTINGS, "promote": "always"},
    )
    assert (p.lr, p.trainable, p.steps, p.promote, p.device) == (3e-4, "decoder", 7, "always", "cpu")
    assert p.labels is None and parse_train_params(
        {"labels": "liver, brain"}, SETTINGS, {"liver": 5, "brain": 90}
    ).labels == ["liver", "brain"]


@pytest.mark.parametrize("preset", ["clicknet_geodesic", "segsam3d_clicknet", "clicknet_dynunet"])
def test_the_click_networks_trainable_parts_name_their_own_modules(preset):
    """SAM's part names match nothing in the early-fusion click network: there each choice names its own modules,
    every prefix matches a weight, the decoder always trains, and LoRA (no attention layer) is refused."""
    from sam3d.models import build_network
    from sam3d.monailabel.train_params import frozen_modules, trainable_parts

    names = [n for n, _ in build_network(preset).named_parameters()]
    assert set(trainable_parts(preset)) == {"decoder", "prompt+decoder", "all"}
    for part in ("decoder", "prompt+decoder"):
        frozen = frozen_modules(part, preset)
        present = [f for f in frozen if any(n.startswith(f + ".") for n in names)]
        assert present and all(f.startswith(("net.", "geodesic_in", "aggregation", "click_modulation")) for f in frozen)
        trained = [n for n in names if not n.startswith(tuple(frozen))]
        assert trained and len(trained) < len(names)
    assert frozen_modules("all", preset) == []
    with pytest.raises(TrainRequestError, match="takes decoder, prompt\\+decoder, all|takes prompt\\+decoder") as e:
        frozen_modules("lora", preset)
    assert e.value.status == 422
    assert frozen_modules("lora", "sam3d_small") == ["image_encoder"]  # SAM's family keeps its parts


def test_auto_learning_rate_and_windows_come_from_the_served_model_config(tmp_path):
    """`lr: auto` and `windows_per_volume: auto` (configs/app.yaml) take the served model config's
    finetune_defaults (clicknet: 1e-3 and 32, chosen in BENCHMARKS.md), else 1e-4 and 8; a value set in the app
    config or sent with the request wins, and /info offers the resolved number."""
    studies = tmp_path / "studies"
    write_studies(studies, 2, labelled=(0, 1))

    def task(conf):
        c = load_app_config(conf, REPO / "configs")
        return Sam3DTrainTask(c.infers["sam3d_point"], c.train, studies / ".sam3d", c.root)

    clicknet = task({"model": "clicknet"})
    assert (clicknet.settings["lr"], clicknet.settings["windows_per_volume"]) == (1e-3, 32)
    assert clicknet.config()["lr"] == 1e-3
    assert parse_train_params({}, clicknet.settings).lr == 1e-3
    assert parse_train_params({"lr": 2e-5}, clicknet.settings).lr == 2e-5
    assert parse_train_params({}, task({"model": "clicknet", "train.lr": "5e-4"}).settings).lr == 5e-4
    model_yaml, _ = write_tiny_model(tmp_path / "models")
    tiny = task({"model": str(model_yaml)})
    assert (tiny.settings["lr"], tiny.settings["windows_per_volume"]) == (1e-4, 8)


def test_the_click_network_fine_tunes_by_its_own_recipe_and_keeps_its_encoder(tmp_path):
    """`train.recipe: auto` takes the model config's finetune_recipe (clicknet's click loop); with the default
    `prompt+decoder` the encoder stages after the first convolution do not move, and the promoted file serves."""
    import shutil

    from sam3d.training import load_recipe

    studies = tmp_path / "studies"
    write_studies(studies, 2, labelled=(0, 1))
    ckpt = tmp_path / "clicknet.safetensors"
    shutil.copy(REPO / "models" / "clicknet.safetensors", ckpt)
    c = load_app_config({"model": "clicknet", "checkpoint": str(ckpt), **QUICK}, REPO / "configs")
    task = Sam3DTrainTask(c.infers["sam3d_point"], c.train, studies / ".sam3d", c.root)
    assert task.recipe_path == REPO / "configs" / "train" / "datastore_finetune_clicknet.yaml"
    assert load_recipe(task.recipe_path)["interactive"]["grad_rounds"] == "last"
    ds = LocalDatastore(str(studies))
    with pytest.raises(TrainRequestError, match="no attention layer|needs a ViT image encoder") as e:
        task.check_request({"trainable": "lora"}, ds)
    assert e.value.status == 422
    before = load_file(str(ckpt))
    done = task({"steps": 1, "promote": "always", "val_split": 0.5}, ds)
    after = load_file(str(ckpt))
    assert done["promoted"] and after.keys() == before.keys()
    moved = {k for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert moved and not [k for k in moved if k.startswith("net.down_layers.")]
    assert any(k.startswith("net.up_layers.") for k in moved)
    load_model({"preset": "clicknet_geodesic", "checkpoint": str(ckpt)})


def test_split_keeps_each_image_on_its_side():
    ids = [f"case{i}" for i in range(40)]
    train, val = split_ids(ids[:20], 0.25)
    train2, val2 = split_ids(ids, 0.25)
    assert set(val) <= set(val2) and set(train) <= set(train2) and not set(train) & set(val)
    assert split_ids(["a"], 0.5) == (["a"], [])
    tr, va = split_ids(["a", "b"], 0.01)  # two images: one validates whatever the hashes say
    assert len(tr) == len(va) == 1


def test_promotion_policy():
    assert should_promote("better", 0.5, 0.5)[0] and not should_promote("better", 0.49, 0.5)[0]
    assert should_promote("better", 0.1, None)[0] and should_promote("always", 0.1, 0.9)[0]
    assert not should_promote("never", 0.9, 0.1)[0]


def test_promote_keeps_the_previous_checkpoint(tmp_path):
    _, old = write_tiny_model(tmp_path / "old", seed=0)
    _, new = write_tiny_model(tmp_path / "new", seed=1)
    old_sha, new_sha = file_sha256(old), file_sha256(new)
    prev = promote(new, old)
    assert prev == previous_path(old) == old.with_name("tiny.prev.safetensors")
    assert file_sha256(prev) == old_sha and file_sha256(old) == new_sha and prev.with_suffix(".yaml").is_file()
    # a served SAM-Med3D-style .pth gets the weights as a plain state_dict under the same name
    pth = tmp_path / "served.pth"
    torch.save({"model_state_dict": load_file(str(old))}, pth)
    promote(new, pth)
    assert (tmp_path / "served.prev.pth").is_file()
    got, want = read_state_dict(pth), load_file(str(new))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_no_labels_or_unusable_model_refused_before_anything_runs(tmp_path):
    task, ds, _ = _task(tmp_path, labelled=())
    with pytest.raises(TrainRequestError, match="no final labels") as e:
        task.check_request({}, ds)
    assert e.value.status == 409 and not task.runs_dir.exists()
    ball = tmp_path / "ball.yaml"
    ball.write_text(yaml.safe_dump({"factory": "fakes:build_ball_model"}))
    c = load_app_config({"model": str(ball)}, REPO / "configs")
    with pytest.raises(TrainRequestError, match="factory model"):
        Sam3DTrainTask(c.infers["sam3d_point"], c.train, tmp_path / "s", c.root).check_request({}, ds)
    task.settings["recipe"] = "configs/train/absent.yaml"
    with pytest.raises(TrainRequestError, match="train recipe not found"):
        task.check_model()


def test_run_in_process_validates_then_promotes_by_policy(tmp_path):
    task, ds, ckpt = _task(tmp_path)
    served = file_sha256(ckpt)
    kept = task({"steps": 2, "promote": "never", "val_split": 0.5}, ds)
    run = Path(kept["run"])
    assert kept["status"] == "done" and not kept["promoted"] and file_sha256(ckpt) == served
    assert (run / "model.safetensors").is_file() and len((run / "metrics.csv").read_text().splitlines()) == 3
    assert kept["holdout"] and len(kept["val_images"]) == 1 and len(kept["train_images"]) == 1
    assert set(kept["validation"]) == {"new", "served"} and 0 <= kept["val_dice"] <= 1
    assert kept["params"]["trainable"] == "prompt+decoder"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["optim"]["freeze"] == ["image_encoder"] and recipe["model"]["init_checkpoint"] == str(ckpt)

    # one named structure: the run trains and validates on label files that hold only its value
    spleen = task({"steps": 1, "promote": "never", "labels": ["spleen"], "val_split": 0.5}, ds)  # spleen: 1
    for folder in ("data", "val"):
        for f in (Path(spleen["run"]) / folder / "labels" / "final").iterdir():
            assert set(np.unique(np.asarray(nib.load(f).dataobj))) == {0, 1}

    done = task({"steps": 2, "promote": "always", "trainable": "decoder"}, ds)
    new = Path(done["run"]) / "model.safetensors"
    assert done["promoted"] and file_sha256(ckpt) == file_sha256(new) == done["checkpoint_sha256"]
    assert file_sha256(previous_path(ckpt)) == served
    assert load_model({"checkpoint": str(ckpt)}).model.img_size == 32  # the promoted file serves
    stats = task.stats()
    assert stats["run"] == done["run"] and stats["step"] == stats["steps"] == 2 and stats["promoted"]
    assert stats["served_sha256"] == file_sha256(ckpt)


def test_lora_run_tunes_only_the_encoders_attention_and_serves_the_same_network(tmp_path):
    task, ds, ckpt = _task(tmp_path)
    before = read_state_dict(ckpt)
    done = task({"steps": 2, "promote": "always", "trainable": "lora", "val_split": 0.5}, ds)
    recipe = yaml.safe_load((Path(done["run"]) / "recipe.yaml").read_text())
    assert recipe["optim"]["lora"] == {"modules": ["image_encoder"], "layers": ["qkv"], "rank": 4, "alpha": 4.0}
    after = read_state_dict(ckpt)  # the promoted file: LoRA folded in, the network's own keys
    assert done["promoted"] and after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    encoder = {k for k in changed if k.startswith("image_encoder.")}
    assert encoder and all(k.endswith(".attn.qkv.weight") for k in encoder)  # no other encoder weight moved
    assert any(k.startswith("mask_decoder.") for k in changed)  # the decoder trains as with prompt+decoder
    load_model({"checkpoint": str(ckpt)})  # strict load into the served network


def test_retrain_policy_counts_distinct_images_and_survives_a_restart(tmp_path):
    submitted = []

    def submit():
        submitted.append(1)
        if len(submitted) == 1:
            raise RuntimeError("no labels")  # a refused start: the labels stay counted
        return {"id": "t"}

    policy = RetrainPolicy(2, tmp_path / "retrain.json", submit)
    assert policy.record("a") is None and policy.record("a") is None and not submitted  # a changed twice: once
    assert policy.record("b") is None and submitted == [1] and policy.pending() == ["a", "b"]
    again = RetrainPolicy(2, tmp_path / "retrain.json", submit)  # after a restart
    assert again.record("c") == {"id": "t"} and again.pending() == []
    assert RetrainPolicy(0, tmp_path / "off.json", submit).record("a") is None and len(submitted) == 2


# ---- through a real server --------------------------------------------------------------------------------------


_wait = functools.partial(wait_for, timeout_s=300)  # a training run on 2 cores; callers may set their own


def _train(client, params):
    try:
        return client.train_start("sam3d", params)
    except MONAILabelClientException as e:
        raise HttpError(e.msg) from None


def _find(client, task_id):
    with urllib.request.urlopen(f"{client._server_url}/train/?all=true") as r:
        return next(t for t in json.load(r) if t["id"] == task_id)


def _finished(client, task_id):
    t = _find(client, task_id)
    return t if t["status"] not in ("SUBMITTED", "RUNNING") else None


def _rows(run: Path) -> int:
    try:
        return len((run / "metrics.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


@pytest.mark.slow
def test_learning_while_annotating_through_the_server(tmp_path):
    from monailabel_server import log_tail, running_server

    studies = tmp_path / "studies"
    ids = write_studies(studies, 3)
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    conf = [("model", model_yaml), ("device", "cpu"), ("train.val_samples", 2), ("train.val_clicks", 2)]
    (tmp_path / "client").mkdir()
    runs = studies / ".sam3d" / "train"
    with running_server(tmp_path, studies, conf) as (url, proc, log):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        click = {"foreground": [[9, 10, 11]], "label": "structure"}

        # refused before anything starts: no labels yet, then bad parameters
        with pytest.raises(HttpError) as e:
            _train(client, {"steps": 2})
        assert e.value.status == 409 and "no final labels" in e.value.detail
        for label_n in (0, 1):
            client.save_label(ids[label_n], str(write_label(volume(label_n)[1], tmp_path / f"l{label_n}.nii.gz")))
        for bad, message in [({"trainable": "encoder"}, "unknown trainable part"), ({"epochs": -1}, "epochs must be")]:
            with pytest.raises(HttpError) as e:
                _train(client, bad)
            assert e.value.status == 422 and message in e.value.detail
        assert not runs.exists()

        served = file_sha256(ckpt)
        _, first = client.infer("sam3d_point", ids[2], dict(click))
        assert first["model_id"] == served

        # a run that is promoted; clicks are answered while it trains
        task = _train(client, {"steps": 40, "promote": "always", "val_split": 0.5})
        run = _wait("the first training step", lambda: next((r for r in runs.glob("*") if _rows(r)), None))
        if _find(client, task["id"])["status"] == "RUNNING":
            _, during = client.infer("sam3d_point", ids[2], dict(click))
            assert during["model_id"] == served
        done = _wait("the run to finish", lambda: _finished(client, task["id"]))
        assert done["status"] == "DONE", log_tail(log)
        assert any("sam3d train: status=done" in line for line in done["details"])
        new = file_sha256(ckpt)
        assert new != served and new == file_sha256(run / "model.safetensors")
        assert file_sha256(previous_path(ckpt)) == served
        _, after = client.infer("sam3d_point", ids[2], dict(click))
        assert after["model_id"] == new  # reloaded without a restart
        stats = client.info()["train_stats"]["sam3d"]
        assert stats["status"] == "done" and stats["step"] == 40 and stats["promoted"] and stats["served_sha256"] == new
        assert stats["val_dice"] is not None and stats["val_dice_served"] is not None

        # a long run, a queued one, and a third request that joins the queued one
        long = _train(client, {"steps": 100000, "promote": "always"})
        queued = _train(client, {"steps": 1, "promote": "never"})
        joined = _train(client, {"steps": 1})
        assert queued["status"] == "SUBMITTED" and joined["id"] == queued["id"]
        before = set(runs.glob("*"))
        long_run = _wait(
            "the long run's first step", lambda: next((r for r in set(runs.glob("*")) - before if _rows(r)), None)
        )
        stopped = client.train_stop()
        assert stopped["id"] == long["id"] and stopped["status"] == "STOPPED"
        assert file_sha256(ckpt) == new and load_model({"checkpoint": str(ckpt)}).model.img_size == 32
        assert json.loads((long_run / "run.json").read_text())["status"] == "running"  # as the kill left it
        client.info()  # /info's train_stats looks at the runs
        assert json.loads((long_run / "run.json").read_text())["status"] == "stopped"
        assert _wait("the queued run", lambda: _finished(client, queued["id"]))["status"] == "DONE"
        assert file_sha256(ckpt) == new  # promote=never
        stats = client.info()["train_stats"]["sam3d"]
        assert stats["status"] == "done" and stats["promoted"] is False and stats["run"] != str(long_run)
        _, last = client.infer("sam3d_point", ids[2], dict(click))
        assert last["model_id"] == new and proc.poll() is None


@pytest.mark.slow
def test_scheduled_retraining_and_the_cron_script(tmp_path):
    """retrain_every 2: the second saved label starts a run; scripts/retrain.py asks for one and waits for it."""
    import subprocess
    import sys

    from monailabel_server import log_tail, running_server

    studies = tmp_path / "studies"
    ids = write_studies(studies, 3)
    model_yaml, ckpt = write_tiny_model(tmp_path / "models")
    conf = [
        ("model", model_yaml),
        ("device", "cpu"),
        ("retrain_every", 2),
        ("train.steps", 2),
        ("train.promote", "never"),
        *QUICK.items(),
    ]
    (tmp_path / "client").mkdir()
    with running_server(tmp_path, studies, conf) as (url, proc, log):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        label = write_label(volume(0)[1], tmp_path / "l.nii.gz")
        client.save_label(ids[0], str(label))
        client.save_label(ids[0], str(label))  # the same image changed again: still one
        with pytest.raises(MONAILabelClientException):
            client.train_status()  # 404: no training yet
        client.save_label(ids[1], str(write_label(volume(1)[1], tmp_path / "l1.nii.gz")))  # on its own grid
        task = client.train_status()
        assert task["request"]["model"] == "sam3d"
        assert _wait("the scheduled run", lambda: _finished(client, task["id"]))["status"] == "DONE", log_tail(log)

        script = [
            sys.executable,
            str(REPO / "scripts" / "retrain.py"),
            "--server",
            url,
            "--wait",
            "--poll",
            "0.5",
            "--param",
            "promote=always",
        ]
        out = subprocess.run(script, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr + log_tail(log)
        assert ": DONE" in out.stdout and '"promoted": true' in out.stdout
        assert file_sha256(ckpt) == client.info()["train_stats"]["sam3d"]["served_sha256"]
        refused = subprocess.run(
            script[:4] + ["--param", "trainable=everything"], capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2 and "unknown trainable part" in refused.stderr
