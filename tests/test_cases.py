"""Reading a data folder: cases, names files (TotalSegmentator JSON, `value name` text), label selection."""

import json

import nibabel as nib
import numpy as np
import pytest

from sam3d.data.cases import find_cases, load_case, parse_label_selection, read_label_names


def _case(folder, names=None, names_file="label_names.json", shape=(6, 7, 8)):
    folder.mkdir(parents=True)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), str(folder / "image.nii.gz"))
    label = np.zeros((6, 7, 8), np.int16)
    label[1:3, 1:3, 1:3] = 4
    label[4, 4, 4] = 9
    nib.save(nib.Nifti1Image(label, affine), str(folder / "label.nii.gz"))
    if names is not None:
        (folder / names_file).write_text(names if isinstance(names, str) else json.dumps(names))


def test_names_files(tmp_path):
    tables = {"total": {"1": "spleen", "23": "kidney_cyst_left"}, "total_mr": {"1": "spleen", "23": "aorta"}}
    (tmp_path / "n.json").write_text(json.dumps(tables))
    assert read_label_names(tmp_path / "n.json", "totalseg_ct") == {1: "spleen", 23: "kidney_cyst_left"}
    assert read_label_names(tmp_path / "n.json", "totalseg_mr")[23] == "aorta"
    assert read_label_names(tmp_path / "n.json", "x", names_key="total_mr")[23] == "aorta"
    with pytest.raises(ValueError, match="no name table"):
        read_label_names(tmp_path / "n.json", "x", names_key="nope")
    (tmp_path / "flat.json").write_text(json.dumps({"liver": 5}))
    assert read_label_names(tmp_path / "flat.json") == {5: "liver"}
    (tmp_path / "aal.txt").write_text("# value name code\n1 Precentral_L 2001\n2 Precentral_R 2002\n\n")
    assert read_label_names(tmp_path / "aal.txt") == {1: "Precentral_L", 2: "Precentral_R"}


def test_one_case_folder_or_a_folder_of_cases(tmp_path):
    _case(tmp_path / "data" / "b", {"4": "four"})
    _case(tmp_path / "data" / "a", "4 four_a\n9 nine\n", names_file="label_names.txt")
    (tmp_path / "data" / "not_a_case").mkdir()
    cases = find_cases(tmp_path / "data")
    assert [c.name for c in cases] == ["a", "b"]
    assert cases[0].names == {4: "four_a", 9: "nine"} and cases[1].label_name(9) == "label_9"
    assert [c.name for c in find_cases(tmp_path / "data" / "a")] == ["a"]
    loaded = load_case(cases[0])
    assert loaded.values() == [4, 9] and loaded.spacing == (2.0, 3.0, 4.0)
    assert parse_label_selection(["four_a,9"], cases[0].names) == [4, 9]
    assert parse_label_selection(None, cases[0].names) is None
    with pytest.raises(ValueError, match="unknown label"):
        parse_label_selection("spleen", cases[0].names)
    with pytest.raises(FileNotFoundError):
        find_cases(tmp_path / "data" / "not_a_case")


def test_label_on_another_grid_is_refused(tmp_path):
    _case(tmp_path / "c", shape=(5, 7, 8))
    with pytest.raises(ValueError, match="differs"):
        load_case(find_cases(tmp_path / "c")[0])


def test_shared_totalseg_names(shared_data):
    ct, mr = find_cases(shared_data / "totalseg_ct")[0], find_cases(shared_data / "totalseg_mr")[0]
    assert [ct.label_name(v) for v in (1, 2, 3, 5, 52)] == ["spleen", "kidney_right", "kidney_left", "liver", "aorta"]
    assert mr.label_name(23) == "aorta"  # total_mr's numbering
