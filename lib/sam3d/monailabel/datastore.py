"""The app's datastore: MONAI Label's local datastore that keeps only whole, valid NIfTI volumes inside the studies
folder.

What MONAI Label's own `LocalDatastore` does not guarantee, and this one does:

- Names: an image id or label tag is one file or folder name inside the studies folder (no `/`, `\\`, leading
  `.`, control characters; at most 200 bytes); the extension is `.nii.gz` or `.nii`, taken from the upload's
  name. Anything else is refused with HTTP 422 before a byte is written. Ids and tags read back from
  `datastore_v2.json` obey the same rules (a hand-edited or old index cannot point outside the folder).
- Uploads are checked before they are registered: a NIfTI file of one 3D volume (no dimension of size 1), at most
  `max_voxels` voxels (read from the header, before any data is decompressed; `SAM3D_MAX_VOXELS`), numbers that
  are finite, read whole (a truncated file fails). A label also lies on its image's grid (same shape and affine)
  and holds non-negative integers. A refusal is HTTP 422 with the reason; an upload MONAI Label left in its
  temporary folder is then deleted (its endpoints delete uploads only after a success).
- Writes: every image, label and index file goes to a hidden temporary file in the destination folder, is flushed
  to disk, and replaces the destination in one rename. A kill at any moment leaves the previous file or the new
  one, never part of one; a previous final label stays until the new one is whole. At start-up the server process
  deletes temporary files that a killed save left behind; the scan never lists them (hidden names, no volume
  extension).
- An image id that exists keeps its image: uploading other content under it is refused (409); the same bytes again
  are accepted as they are.

A DICOMweb studies URL keeps MONAI Label's datastore, whose lookups by id fetch the series into a cache folder
named by the id; `guard_dicomweb_lookups` makes an id that is not a plain name, or not a series of the server, a
404 and an unreachable or failing server a 502, where MONAI Label would answer 500 (or read another folder).
It also makes the PACS the source of final labels (`follow_pacs_labels`): the newest DICOM SEG series on the server
that references an image series (ReferencedSeriesSequence; stored by OHIF's "Export DICOM SEG" or by a final
`PUT /datastore/label`) is that image's final label, converted once into the cache as NIfTI on the image's own grid
(voxel values = segment numbers), which the train task reads. MONAI Label lists such images as labelled, but its
lookup of the label (`get_label_uri(image id, "final")`) downloads the image series as if it were the SEG, and its
conversion writes a `.seg.nrrd` cropped to the segmented slices, which training cannot use.
"""

import filecmp
import functools
import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from ..engine.checkpoint import atomic_write

logger = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii")  # longest first: a name ending in .nii.gz is not a .nii
MAX_VOXELS_ENV = "SAM3D_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 512 * 512 * 1024  # a whole-body CT; 1000^3 (a few GB once read) is refused from its header
MAX_NAME_BYTES = 200  # the temporary name adds about 21 bytes; file names stop at 255
SLAB_VOXELS = 1 << 24  # an upload is read this many voxels at a time: memory stays small whatever its size
AFFINE_ATOL_MM = 1e-3  # as sam3d.data.cases: float32 rounding of the NIfTI header, not another grid
# atomic_write's temporary files: `.<name>.<8 random characters>.tmp` beside the file they become
PARTIAL_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class Refused(HTTPException):
    """A request the datastore refuses; MONAI Label's endpoints answer it as is (status and reason)."""

    def __init__(self, detail: str, status_code: int = 422):
        super().__init__(status_code=status_code, detail=detail)


def max_voxels_setting() -> int:
    """`SAM3D_MAX_VOXELS` from the environment, else DEFAULT_MAX_VOXELS."""
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    if not value.isdigit() or int(value) < 8:
        raise ValueError(f"{MAX_VOXELS_ENV} must be a whole number of voxels (at least 8), got {value!r}")
    return int(value)


def name_problem(name) -> str | None:
    """Why `name` cannot be an image id or label tag (one plain, visible name in its folder), or None."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "must be a name, not a path (no '/' or '\\')"
    if name.startswith("."):
        return "must not start with '.'"
    if not name.isprintable():
        return "must not contain control characters"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def guard_dicomweb_lookups(ds) -> None:
    """Wraps the image and label lookups of MONAI Label's `DICOMWebDatastore` `ds` (see the module docstring)."""
    for method in ("get_image_uri", "get_label_uri"):
        setattr(ds, method, _series_lookup(getattr(ds, method)))
    follow_pacs_labels(ds)


FINAL = DefaultLabelTag.FINAL.value


def follow_pacs_labels(ds) -> None:
    """The newest SEG on the PACS that references an image is its final label (see the module docstring)."""
    remote_label_uri = ds.get_label_uri

    def get_label_by_image_id(image_id: str, tag: str) -> str:
        if str(getattr(tag, "value", tag)) == FINAL:
            try:
                sync_pacs_label(ds, image_id)
            except Exception as e:  # noqa: BLE001 - the PACS or the conversion failed: keep what the cache holds
                logger.warning(
                    f"sam3d datastore: the final label of {image_id} on the PACS not read ({e}); "
                    "using the cached one, if any"
                )
        return LocalDatastore.get_label_by_image_id(ds, image_id, tag)

    def get_label_uri(label_id: str, label_tag: str, image_id: str = "") -> str:
        tag = str(getattr(label_tag, "value", label_tag))
        if tag == FINAL and ds._datastore.label(label_id, FINAL):  # a label id of the cache: the image's id
            return LocalDatastore.get_label_uri(ds, label_id, FINAL)
        return remote_label_uri(label_id, label_tag, image_id) if image_id else remote_label_uri(label_id, label_tag)

    labeled_images = ds.get_labeled_images

    def get_labeled_images(label_tag=None, labels=None) -> list[str]:  # MONAI Label's: an image once per SEG
        return list(dict.fromkeys(labeled_images(label_tag, labels)))

    ds.get_label_by_image_id = get_label_by_image_id
    ds.get_label_uri = get_label_uri
    ds.get_labeled_images = get_labeled_images


def pacs_segs(ds, image_id: str) -> list[dict]:
    """The SEG series on the PACS that reference series `image_id`, newest first (series date and time)."""
    from pydicom.dataset import Dataset

    client = ds._client
    found = client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
    if not found:
        return []
    study = str(Dataset.from_json(found[0]).StudyInstanceUID)
    segs = []
    for meta in client.search_for_series(study, search_filters={"Modality": "SEG"}):
        seg = str(Dataset.from_json(meta).SeriesInstanceUID)
        first = Dataset.from_json(client.retrieve_series_metadata(study, seg)[0])
        refs = first.get("ReferencedSeriesSequence") or []
        if any(str(r.get("SeriesInstanceUID", "")) == image_id for r in refs):
            when = tuple(str(first.get(k, "")) for k in ("SeriesDate", "SeriesTime", "ContentDate", "ContentTime"))
            segs.append(
                {"study": study, "series": seg, "when": when, "description": str(first.get("SeriesDescription", ""))}
            )
    return sorted(segs, key=lambda s: (s["when"], s["series"]), reverse=True)


def sync_pacs_label(ds, image_id: str) -> None:
    """Makes the cache's final label of `image_id` the newest SEG on the PACS that references it (a no-op when it
    already is, or when the cached label was saved through the app: its SEG then is that one); drops a cached
    label whose SEG is gone from the PACS."""
    segs = pacs_segs(ds, image_id)
    label_id = LocalDatastore.get_label_by_image_id(ds, image_id, FINAL)
    cached = LocalDatastore.get_label_info(ds, label_id, FINAL) if label_id else {}
    cached_file = LocalDatastore.get_label_uri(ds, label_id, FINAL) if label_id else ""
    if not segs:
        if label_id and cached.get("SeriesInstanceUID") and cached.get("Modality") == "SEG":
            logger.info(f"sam3d datastore: SEG {cached['SeriesInstanceUID']} of {image_id} is gone from the PACS")
            LocalDatastore.remove_label(ds, label_id, FINAL)
        return
    newest = segs[0]
    if cached.get("SeriesInstanceUID") == newest["series"] and volume_extension(os.path.basename(cached_file)):
        return
    image_file = ds.get_image_uri(image_id)
    label_file = seg_to_nifti(ds, newest, image_file)
    try:
        LocalDatastore.save_label(
            ds,
            image_id,
            label_file,
            FINAL,
            {
                "SeriesInstanceUID": newest["series"],
                "Modality": "SEG",
                "StudyInstanceUID": newest["study"],
                "SeriesDescription": newest["description"],
                "source": "pacs",
            },
        )
    finally:
        os.unlink(label_file)
    logger.info(f"sam3d datastore: final label of {image_id} is SEG {newest['series']} ({newest['description']!r})")


def seg_to_nifti(ds, seg: dict, image_file: str) -> str:
    """A temporary .nii.gz: the SEG series `seg` (pacs_segs' entry) on the grid of the NIfTI `image_file`, each
    voxel the number of its segment (0: none)."""
    import tempfile

    import pydicom
    import pydicom_seg
    import SimpleITK as sitk
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    with tempfile.TemporaryDirectory(prefix="sam3d-seg-") as folder:
        dicom_web_download_series(seg["study"], seg["series"], folder, ds._client)
        files = sorted(Path(folder).rglob("*.dcm")) or sorted(p for p in Path(folder).rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"SEG series {seg['series']} has no instance")
        result = pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(files[0])))
    image = sitk.ReadImage(image_file)
    label = sitk.Resample(result.image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    sitk.WriteImage(label, out, True)
    return out


def _series_lookup(lookup):
    @functools.wraps(lookup)
    def guarded(series_id, *args, **kwargs):
        problem = name_problem(series_id)
        if problem:
            raise Refused(f"series {series_id!r} {problem}", status_code=404)
        try:
            return lookup(series_id, *args, **kwargs)
        except IndexError:  # MONAI Label's download indexes the server's answer to a search for the series
            raise Refused(f"series {series_id!r} is not on the DICOMweb server", status_code=404) from None
        except requests.HTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status in (400, 404):
                detail, code = f"series {series_id!r} is not on the DICOMweb server ({status})", 404
            else:
                detail, code = f"the DICOMweb server answered {status} for series {series_id!r}", 502
            raise Refused(detail, status_code=code) from None
        except requests.RequestException as e:
            raise Refused(f"cannot reach the DICOMweb server: {e}", status_code=502) from None

    return guarded


def checked_name(what: str, name) -> str:
    name = getattr(name, "value", name)  # MONAI Label passes DefaultLabelTag members for tags
    problem = name_problem(name)
    if problem:
        raise Refused(f"{what} {name!r} {problem}")
    return name


def volume_extension(filename: str) -> str | None:
    return next((e for e in EXTENSIONS if filename.endswith(e) and len(filename) > len(e)), None)


def checked_extension(what: str, path: str) -> str:
    ext = volume_extension(os.path.basename(path))
    if ext is None:
        raise Refused(
            f"{what}: only NIfTI files are kept (a name ending in {' or '.join(EXTENSIONS)}); "
            f"the uploaded file's name has no such extension"
        )
    return ext


def open_volume(what: str, path: str, max_voxels: int):
    """The NIfTI image at `path`, its header checked (nothing of the data read yet)."""
    try:
        img = nib.load(path, mmap=False, keep_file_open=True)  # one open file: the slabs decompress once
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise Refused(f"{what} is not a readable NIfTI file: {e}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise Refused(f"{what} is not a NIfTI file ({type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 3:
        raise Refused(f"{what} has shape {shape}: expected one 3D volume")
    if min(shape) < 2:
        raise Refused(f"{what} is 2D (shape {shape}): expected a 3D volume")
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise Refused(
            f"{what} is too large: {shape} is {voxels:,} voxels; this server takes at most "
            f"{max_voxels:,} ({MAX_VOXELS_ENV})"
        )
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise Refused(f"{what} has voxels of type {dtype}: expected integers or real numbers")
    affine = img.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Refused(f"{what} has no usable voxel-to-world affine (spacing 0 or not finite)")
    return img


def _value_problem(values: np.ndarray, label: bool) -> str | None:
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            return "holds NaN or infinite values"
        if label and not np.array_equal(values, np.round(values)):
            return "holds values that are not whole numbers: a label holds one integer per structure"
    if label and values.size and values.min() < 0:
        return "holds negative values: a label holds 0 (background) and positive integers"
    return None


def check_values(what: str, img, label: bool = False) -> None:
    """Reads all of the data, a slab at a time: finite numbers (a label: non-negative integers), none missing."""
    nx, ny, nz = img.shape
    step = max(1, SLAB_VOXELS // (nx * ny))
    try:
        for k in range(0, nz, step):
            problem = _value_problem(np.asanyarray(img.dataobj[:, :, k : k + step]), label)
            if problem:
                raise Refused(f"{what} {problem}")
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 - a short or damaged data block, whatever the reader raises
        raise Refused(f"{what} cannot be read whole (truncated or damaged): {e}") from None


def check_on_grid(label_img, image_path: str) -> None:
    try:
        image = nib.load(image_path)
        shape, affine = tuple(int(n) for n in image.shape[:3]), image.affine
    except Exception as e:  # noqa: BLE001 - a damaged file placed in the folder by hand
        raise Refused(
            f"the label's image cannot be read, so the label cannot be checked: {e}", status_code=409
        ) from None
    if tuple(label_img.shape) != shape:
        raise Refused(
            f"label has shape {tuple(label_img.shape)}, its image {shape}: a label must lie on its image's grid"
        )
    if not np.allclose(label_img.affine, affine, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(label_img.affine - affine).max())
        raise Refused(
            f"label's affine differs from its image's (by up to {worst:.4g}): a label must lie on its image's grid"
        )


def durable_write(dest: Path, fill) -> None:
    """`fill(file)` writes the content; it reaches the disk under a hidden temporary name, then one rename makes
    it `dest`, and the folder entry is flushed too: after a kill or a power cut `dest` is old or new, whole."""

    def write(tmp):
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(dest, write)
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def copy_durably(src: str, dest: Path) -> None:
    def fill(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)

    durable_write(dest, fill)


@contextmanager
def _deleted_on_error(path: str):
    try:
        yield
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def remove_partial_files(folder: Path, config_name: str) -> list[str]:
    """Deletes what a killed save left in `folder` (the temporary files of durable_write); returns their names."""
    removed = []
    for entry in os.scandir(folder):
        m = PARTIAL_FILE.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and (volume_extension(m["name"]) or m["name"] == config_name):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


class Sam3DDatastore(LocalDatastore):
    """MONAI Label's `LocalDatastore` (the layout `<id>.nii.gz`, `labels/<tag>/<id>.nii.gz`, `datastore_v2.json`)
    with the checks and durable writes of this module's docstring.

    `upload_dir`: where MONAI Label's endpoints put uploads (the system temporary folder): a refused upload from
    there is deleted. `clean_partial_files`: delete the temporary files of killed saves at start-up (the server
    process only: a training process starts while the server may be writing one).
    """

    def __init__(
        self,
        datastore_path: str,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        upload_dir: str | None = None,
        clean_partial_files: bool = True,
        datastore_config: str = "datastore_v2.json",
        auto_reload: bool = False,
        read_only: bool = False,
    ):
        self.max_voxels = max_voxels
        self.upload_dir = Path(upload_dir).resolve() if upload_dir else None
        if clean_partial_files and not read_only:
            self._remove_partial_files(Path(datastore_path), datastore_config)
        super().__init__(
            datastore_path,
            datastore_config=datastore_config,
            extensions=tuple(f"*{e}" for e in EXTENSIONS),
            auto_reload=auto_reload,
            read_only=read_only,
        )

    @staticmethod
    def _remove_partial_files(root: Path, config_name: str) -> None:
        if not root.is_dir():
            return  # a new datastore: MONAI Label makes the folder
        for folder in [root, *sorted(p for p in (root / "labels").glob("*") if p.is_dir())]:
            for name in remove_partial_files(folder, config_name):
                logger.warning(f"sam3d: removed {folder / name}, the rest of a save that did not finish")

    # --- writes -----------------------------------------------------------------------------------------------

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        with self._refused_upload_deleted(image_filename):
            ext = checked_extension("image", image_filename)
            image_id = checked_name("image id", image_id or os.path.basename(image_filename)[: -len(ext)])
            existing = self._existing_image(image_id)
            if existing is not None:
                if filecmp.cmp(existing, image_filename, shallow=False):
                    return image_id  # the same upload again (a client retrying): nothing to do
                raise Refused(
                    f"image {image_id!r} exists with other content: remove it first, or upload under another id",
                    status_code=409,
                )
            img = open_volume("image", image_filename, self.max_voxels)
            check_values("image", img)
            dest = Path(self._datastore.image_path()) / f"{image_id}{ext}"
            with FileLock(self._lock_file):
                copy_durably(image_filename, dest)
                info = {**(image_info or {}), "ts": int(time.time()), "name": dest.name}
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
                self._update_datastore_file(lock=False)
        logger.info(f"sam3d: added image {image_id} ({dest.name})")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        with self._refused_upload_deleted(label_filename):
            tag = checked_name("label tag", label_tag or DefaultLabelTag.FINAL.value)
            image_id = checked_name("image id", image_id)
            self._registered(image_id)
            ext = checked_extension("label", label_filename)
            img = open_volume("label", label_filename, self.max_voxels)
            check_on_grid(img, self.get_image_uri(image_id))
            check_values("label", img, label=True)
            folder = Path(self._datastore.label_path(tag))
            dest = folder / f"{image_id}{ext}"
            with FileLock(self._lock_file):
                folder.mkdir(parents=True, exist_ok=True)
                copy_durably(label_filename, dest)
                info = {**(label_info or {}), "ts": int(time.time()), "name": dest.name}
                self._registered(image_id).labels[tag] = DataModel(info=info, ext=ext)  # the model as it is now
                self._update_datastore_file(lock=False)
                for other in EXTENSIONS:  # a label saved before with the other extension is now replaced
                    if other != ext:
                        (folder / f"{image_id}{other}").unlink(missing_ok=True)
        logger.info(f"sam3d: saved label {tag}/{dest.name}")
        return image_id

    def remove_image(self, image_id: str) -> None:
        image_id = checked_name("image id", image_id)
        self._registered(image_id)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._label(label_id, label_tag)
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict) -> None:
        self._registered(checked_name("image id", image_id))
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        self._label(label_id, label_tag)
        super().update_label_info(label_id, label_tag, info)

    # --- lookups: an id or tag the datastore does not hold is 404 (MONAI Label answers {} or 500) ----------------

    def get_image_info(self, image_id: str) -> dict:
        self._registered(checked_name("image id", image_id))
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> dict:
        self._label(label_id, label_tag)
        return super().get_label_info(label_id, label_tag)

    def _registered(self, image_id: str) -> ImageLabelModel:
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise Refused(f"image {image_id!r} is not in the datastore", status_code=404)
        return obj

    def _label(self, image_id: str, tag) -> DataModel:
        tag = checked_name("label tag", tag)
        label = self._registered(checked_name("image id", image_id)).labels.get(tag)
        if label is None:
            raise Refused(f"image {image_id!r} has no label tagged {tag!r}", status_code=404)
        return label

    def _existing_image(self, image_id: str) -> str | None:
        """The file of `image_id`, registered or only on disk (not scanned yet)."""
        uri = self.get_image_uri(image_id)
        if uri:
            return uri
        on_disk = [Path(self._datastore.image_path()) / f"{image_id}{e}" for e in EXTENSIONS]
        return next((str(p) for p in on_disk if p.exists()), None)

    def _refused_upload_deleted(self, upload: str):
        """Context: a refused upload that MONAI Label left in `upload_dir` is deleted (nobody else would)."""
        if self.upload_dir is None or Path(upload).resolve().parent != self.upload_dir:
            return nullcontext()
        return _deleted_on_error(upload)

    def _update_datastore_file(self, lock=True):
        """The index through durable_write: MONAI Label rewrites it in place (a kill leaves half a JSON file)."""
        with FileLock(self._lock_file) if lock else nullcontext():
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            path = Path(self._datastore_config_path)
            durable_write(path, lambda f: f.write(text.encode()))
            self._config_ts = path.stat().st_mtime

    # --- reads: what the folder and the index may hold ---------------------------------------------------------

    def _init_from_datastore_file(self, throw_exception=False):
        """MONAI Label's, but a damaged index does not stop the server (the scan rebuilds it from the files),
        and entries that would name files outside the studies folder are dropped."""
        super()._init_from_datastore_file(throw_exception=False)
        ds = self._datastore
        ds.images_dir, ds.labels_dir = ".", "labels"  # where this class writes; never the index's say
        for image_id, obj in list(ds.objects.items()):
            if name_problem(image_id) or obj.image.ext not in EXTENSIONS:
                logger.warning(f"sam3d: ignoring index entry {image_id!r}: not a plain file of the studies folder")
                del ds.objects[image_id]
                continue
            for tag, label in list(obj.labels.items()):
                if name_problem(tag) or label.ext not in EXTENSIONS:
                    logger.warning(f"sam3d: ignoring label {tag!r} of {image_id!r}: not a plain file of its folder")
                    del obj.labels[tag]

    def _to_id(self, file: str):
        """(id, extension): only the end of the name is the extension (MONAI Label strips it anywhere)."""
        ext = volume_extension(file)
        return (file[: -len(ext)], ext) if ext else super()._to_id(file)

    def _list_files(self, path, patterns):
        """The scan's files, less hidden ones (temporary files, macOS `._` files) and others no id could name."""
        files = super()._list_files(path, patterns)
        return {k: v for k, v in files.items() if name_problem(self._to_id(v)[0]) is None}

    def _add_non_existing_labels(self, tag) -> int:
        return super()._add_non_existing_labels(tag) if name_problem(tag) is None else 0
