"""The app's datastore (sam3d.monailabel.datastore) on small volumes in a temporary folder: names that stay inside
the studies folder, uploads checked before they are registered, and files that are old or new but never half
written, whatever moment a save is killed at."""

import gzip
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.interfaces.datastore import DefaultLabelTag

from sam3d.monailabel import datastore as datastore_module
from sam3d.monailabel.datastore import Refused, Sam3DDatastore, max_voxels_setting

SHAPE = (20, 18, 16)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def nifti(path: Path, array, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def image_array(seed=0):
    return np.random.default_rng(seed).normal(100, 10, SHAPE).astype(np.float32)


def label_array(value=1):
    label = np.zeros(SHAPE, np.uint8)
    label[5:10, 5:10, 5:10] = value
    return label


def header_only(path: Path, shape, dtype=np.uint8) -> Path:
    """A .nii.gz whose header promises `shape` and whose data is 1,000 zero bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, 1)
    buf = io.BytesIO()
    header.write_to(buf)
    buf.write(bytes(1000))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def tree(folder: Path) -> dict:
    """path -> bytes of every file below `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    nifti(folder / "ct.nii.gz", image_array())
    return folder


@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def ds(studies, uploads):
    return Sam3DDatastore(str(studies), upload_dir=str(uploads))


def refused(call, status=422) -> str:
    with pytest.raises(Refused) as e:
        call()
    assert e.value.status_code == status, e.value.detail
    return e.value.detail


# --- names ----------------------------------------------------------------------------------------------------

ESCAPING_IDS = ["../pwn", "../../pwn", "/tmp/abs", "sub/x", "..", ".", ".hidden", "a\\b", "x\ny", "a" * 201]


@pytest.mark.parametrize("image_id", ESCAPING_IDS)
def test_an_image_id_that_is_not_a_plain_name_is_refused_and_nothing_is_written(ds, tmp_path, uploads, image_id):
    upload = nifti(uploads / "up.nii.gz", image_array(1))
    before = tree(tmp_path)
    del before["uploads/up.nii.gz"]  # a refused upload is deleted
    assert "image id" in refused(lambda: ds.add_image(image_id, str(upload), {}))
    assert tree(tmp_path) == before and ds.list_images() == ["ct"]


@pytest.mark.parametrize("name", ["a", "a.nrrd", "a.nii.gz.exe", "a.mha", "a.NII"])
def test_an_upload_without_a_nifti_extension_is_refused(ds, uploads, name):
    upload = uploads / name
    nifti(uploads / "x.nii.gz", image_array(1)).rename(upload)
    assert "NIfTI" in refused(lambda: ds.add_image("new", str(upload), {}))
    assert ds.list_images() == ["ct"]


@pytest.mark.parametrize("tag", ["../../x", "a/b", ".x", "..", "final\0"])
def test_a_label_tag_that_is_not_a_plain_name_is_refused(ds, studies, uploads, tag):
    upload = nifti(uploads / "lab.nii.gz", label_array())
    before = tree(studies.parent)
    assert "label tag" in refused(lambda: ds.save_label("ct", str(upload), tag, {}))
    assert tree(studies.parent).keys() <= before.keys()  # only the refused upload went
    assert ds.get_labels_by_image_id("ct") == {}


def test_remove_refuses_escaping_ids_and_tags_and_leaves_outside_files_alone(ds, tmp_path):
    outside = tmp_path / "pwn.nii.gz"
    outside.write_bytes(b"keep me")
    refused(lambda: ds.remove_image("../pwn"))
    refused(lambda: ds.remove_label("ct", "../.."))
    refused(lambda: ds.remove_label("../pwn", "final"))
    refused(lambda: ds.remove_image("absent"), status=404)
    assert outside.read_bytes() == b"keep me" and ds.list_images() == ["ct"]


def test_index_entries_that_point_outside_are_ignored(studies, tmp_path):
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(b"keep me")
    Sam3DDatastore(str(studies))
    index = json.loads((studies / "datastore_v2.json").read_text())
    index["objects"]["../outside"] = {"image": {"ext": ".nii.gz", "info": {}}, "labels": {}}
    index["objects"]["ct"]["labels"]["../.."] = {"ext": ".nii.gz", "info": {}}
    index["labels_dir"] = "../.."
    (studies / "datastore_v2.json").write_text(json.dumps(index))
    ds = Sam3DDatastore(str(studies))
    assert ds.list_images() == ["ct"] and ds.get_image_uri("../outside") == ""
    assert ds.get_labels_by_image_id("ct") == {}
    refused(lambda: ds.remove_image("../outside"))
    assert outside.read_bytes() == b"keep me"


# --- what an upload must be -----------------------------------------------------------------------------------


def _bad_image(kind: str, path: Path) -> Path:
    if kind == "corrupt":
        path.write_bytes(os.urandom(4000))
    elif kind == "truncated":
        nifti(path, image_array(1))
        path.write_bytes(path.read_bytes()[:-3000])
    elif kind == "2d_one_slice":
        nifti(path, image_array(1)[:, :, :1])
    elif kind == "2d":
        nifti(path, image_array(1)[:, :, 0])
    elif kind == "4d":
        nifti(path, np.stack([image_array(1)] * 2, -1))
    elif kind in ("nan", "inf"):
        a = image_array(1)
        a[3, 4, 5] = np.nan if kind == "nan" else np.inf
        nifti(path, a)
    elif kind == "complex":
        nifti(path, image_array(1).astype(np.complex64))
    elif kind == "huge":
        header_only(path, (1000, 1000, 1000))
    return path


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("corrupt", "not a readable NIfTI"),
        ("truncated", "cannot be read whole"),
        ("2d_one_slice", "is 2D"),
        ("2d", "expected one 3D volume"),
        ("4d", "expected one 3D volume"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("complex", "type complex64"),
        ("huge", "too large"),
    ],
)
def test_a_bad_image_is_refused_with_the_reason_and_not_registered(ds, studies, uploads, kind, fragment):
    upload = _bad_image(kind, uploads / "up.nii.gz")
    before = tree(studies)
    assert fragment in refused(lambda: ds.add_image("new", str(upload), {}))
    assert tree(studies) == before and ds.list_images() == ["ct"]
    assert not upload.exists(), "a refused upload from the upload folder is deleted"


def test_the_voxel_cap_is_read_from_the_header_and_set_by_the_environment(studies, uploads, monkeypatch):
    small = Sam3DDatastore(str(studies), max_voxels=1000)
    upload = nifti(uploads / "up.nii.gz", image_array(1))
    assert "5,760 voxels" in refused(lambda: small.add_image("new", str(upload), {}))
    monkeypatch.setenv("SAM3D_MAX_VOXELS", "1000")
    assert max_voxels_setting() == 1000
    monkeypatch.setenv("SAM3D_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="SAM3D_MAX_VOXELS"):
        max_voxels_setting()


def test_a_good_image_is_copied_in_and_registered(ds, studies, uploads):
    upload = nifti(uploads / "up.nii", image_array(1))
    assert ds.add_image("mr 1", str(upload), {"source": "test"}) == "mr 1"
    assert (studies / "mr 1.nii").read_bytes() == upload.read_bytes()
    assert upload.exists(), "an accepted upload is MONAI Label's to delete"
    assert ds.get_image_info("mr 1")["source"] == "test"
    assert sorted(Sam3DDatastore(str(studies)).list_images()) == ["ct", "mr 1"]
    assert sorted(Sam3DDatastore(str(studies)).get_unlabeled_images()) == ["ct", "mr 1"]


def test_an_existing_image_id_keeps_its_image(ds, studies, uploads):
    same = uploads / "same.nii.gz"
    shutil.copy(studies / "ct.nii.gz", same)
    before = tree(studies)
    assert ds.add_image("ct", str(same), {}) == "ct"  # a retry: accepted as it is
    other = nifti(uploads / "other.nii.gz", image_array(2))
    assert "exists with other content" in refused(lambda: ds.add_image("ct", str(other), {}), status=409)
    assert tree(studies) == before


def test_a_refused_upload_outside_the_upload_folder_is_left_alone(studies, tmp_path):
    ds = Sam3DDatastore(str(studies), upload_dir=str(tmp_path / "uploads"))
    mine = _bad_image("nan", tmp_path / "mine.nii.gz")
    refused(lambda: ds.add_image("new", str(mine), {}))
    assert mine.exists()


# --- labels ---------------------------------------------------------------------------------------------------


def test_a_good_label_is_saved_as_final_and_the_image_leaves_the_queue(ds, studies, uploads):
    upload = nifti(uploads / "lab.nii.gz", label_array())
    assert ds.save_label("ct", str(upload), "", {"user": "ann"}) == "ct"
    saved = studies / "labels" / "final" / "ct.nii.gz"
    assert saved.read_bytes() == upload.read_bytes()
    again = Sam3DDatastore(str(studies))
    assert again.get_labeled_images() == ["ct"] and again.get_unlabeled_images() == []
    assert again.get_label_info("ct", "final")["user"] == "ann"


def test_a_float_label_of_whole_numbers_and_an_infer_tag_are_accepted(ds, studies, uploads):
    upload = nifti(uploads / "lab.nii.gz", label_array(2).astype(np.float32))
    ds.save_label("ct", str(upload), DefaultLabelTag.ORIGINAL, {})
    assert (studies / "labels" / "original" / "ct.nii.gz").exists()
    assert ds.get_label_by_image_id("ct", "original") == "ct"


def _bad_label(kind: str, path: Path) -> Path:
    if kind == "wrong_shape":
        return nifti(path, label_array()[:, :, :3])
    if kind == "other_grid":
        return nifti(path, label_array(), np.diag([1.0, 2.0, 2.0, 1.0]))
    if kind == "fraction":
        return nifti(path, label_array().astype(np.float32) * 0.5)
    if kind == "negative":
        return nifti(path, label_array().astype(np.int16) * -1)
    if kind == "nan":
        a = label_array().astype(np.float32)
        a[0, 0, 0] = np.nan
        return nifti(path, a)
    return _bad_image(kind, path)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("wrong_shape", "image's grid"),
        ("other_grid", "affine differs"),
        ("fraction", "not whole numbers"),
        ("negative", "negative values"),
        ("nan", "NaN"),
        ("corrupt", "not a readable NIfTI"),
        ("truncated", "cannot be read whole"),
        ("huge", "too large"),
    ],
)
def test_a_bad_label_is_refused_and_the_previous_final_label_is_kept(ds, studies, uploads, kind, fragment):
    ds.save_label("ct", str(nifti(uploads / "good.nii.gz", label_array())), "final", {})
    before = tree(studies)
    upload = _bad_label(kind, uploads / "bad.nii.gz")
    assert fragment in refused(lambda: ds.save_label("ct", str(upload), "final", {}))
    assert tree(studies) == before and ds.get_labeled_images() == ["ct"]
    assert not upload.exists()


def test_a_label_for_an_unknown_image_is_404(ds, uploads):
    upload = nifti(uploads / "lab.nii.gz", label_array())
    assert "not in the datastore" in refused(lambda: ds.save_label("absent", str(upload), "final", {}), status=404)


def test_lookups_and_updates_of_unknown_images_and_labels_are_404(ds, uploads):
    ds.save_label("ct", str(nifti(uploads / "lab.nii.gz", label_array())), "final", {})
    for call in (
        lambda: ds.get_image_info("absent"),
        lambda: ds.update_image_info("absent", {"a": 1}),
        lambda: ds.get_label_info("absent", "final"),
        lambda: ds.remove_label("absent", "final"),
    ):
        assert "'absent' is not in the datastore" in refused(call, status=404)
    for call in (
        lambda: ds.get_label_info("ct", "reviewed"),
        lambda: ds.update_label_info("ct", "reviewed", {}),
        lambda: ds.remove_label("ct", "reviewed"),
    ):
        assert "has no label tagged 'reviewed'" in refused(call, status=404)
    ds.update_image_info("ct", {"a": 1})
    ds.update_label_info("ct", DefaultLabelTag.FINAL, {"b": 2})  # MONAI Label passes tags as enum members too
    assert ds.get_image_info("ct")["a"] == 1 and ds.get_label_info("ct", "final")["b"] == 2
    ds.remove_label("ct", "final")
    assert ds.get_labeled_images() == []


def test_a_label_saved_with_the_other_extension_replaces_the_first(ds, studies, uploads):
    ds.save_label("ct", str(nifti(uploads / "a.nii", label_array(1))), "final", {})
    ds.save_label("ct", str(nifti(uploads / "b.nii.gz", label_array(2))), "final", {})
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["ct.nii.gz"]
    assert Path(ds.get_label_uri("ct", "final")).name == "ct.nii.gz"


# --- a save killed at any moment --------------------------------------------------------------------------------


def test_a_save_that_fails_halfway_keeps_the_previous_label_and_leaves_no_file(ds, studies, uploads, monkeypatch):
    ds.save_label("ct", str(nifti(uploads / "good.nii.gz", label_array(1))), "final", {})
    before = tree(studies)

    def half_then_fail(src, dst, length=0):
        dst.write(src.read()[:500])
        raise OSError("disk gone")

    monkeypatch.setattr(datastore_module.shutil, "copyfileobj", half_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        ds.save_label("ct", str(nifti(uploads / "new.nii.gz", label_array(2))), "final", {})
    assert tree(studies) == before
    assert not (uploads / "new.nii.gz").exists()


def test_the_index_is_replaced_by_a_rename_not_rewritten(ds, studies, uploads):
    index = studies / "datastore_v2.json"
    inode = index.stat().st_ino
    ds.save_label("ct", str(nifti(uploads / "lab.nii.gz", label_array())), "final", {})
    assert index.stat().st_ino != inode
    assert json.loads(index.read_text())["objects"]["ct"]["labels"]["final"]["ext"] == ".nii.gz"


def _partial(folder: Path, name: str, content: bytes) -> Path:
    """What durable_write leaves when killed before its rename."""
    path = folder / f".{name}.ab_c1234.tmp"
    path.write_bytes(content)
    return path


def test_files_of_a_killed_save_are_not_listed_and_are_removed_at_start(ds, studies):
    final = studies / "labels" / "final"
    partials = [
        _partial(studies, "new.nii.gz", b"half an image"),
        _partial(final, "ct.nii.gz", b"half a label"),
        _partial(studies, "datastore_v2.json", b'{"half": '),
    ]
    kept = Sam3DDatastore(str(studies), clean_partial_files=False)  # a task process: the server may be writing
    assert kept.list_images() == ["ct"] and kept.get_labeled_images() == []
    assert all(p.exists() for p in partials)
    ds = Sam3DDatastore(str(studies))
    assert ds.list_images() == ["ct"] and ds.get_unlabeled_images() == ["ct"]
    assert not any(p.exists() for p in partials)


def test_a_label_in_place_but_not_yet_in_the_index_is_listed_at_start(ds, studies):
    nifti(studies / "labels" / "final" / "ct.nii.gz", label_array())  # killed between the rename and the index
    assert Sam3DDatastore(str(studies)).get_labeled_images() == ["ct"]


def test_a_damaged_index_is_rebuilt_from_the_files(ds, studies, uploads):
    ds.save_label("ct", str(nifti(uploads / "lab.nii.gz", label_array())), "final", {})
    index = studies / "datastore_v2.json"
    index.write_text(index.read_text()[:40])  # what MONAI Label's in-place write leaves when killed
    again = Sam3DDatastore(str(studies))
    assert again.list_images() == ["ct"] and again.get_labeled_images() == ["ct"]
    assert json.loads(index.read_text())["objects"]["ct"]["labels"]["final"]


def test_the_scan_takes_only_the_end_of_a_name_as_extension_and_skips_hidden_files(studies):
    nifti(studies / "a.nii.gz.b.nii.gz", image_array(1))
    nifti(studies / "._ct.nii.gz", image_array(1))  # what macOS leaves beside a copied file
    assert sorted(Sam3DDatastore(str(studies)).list_images()) == ["a.nii.gz.b", "ct"]
