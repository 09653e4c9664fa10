"""A NIfTI volume as a DICOM CT series (one file a slice), for tests that need a PACS to hold a real series."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_series(nifti: Path, out: Path, patient: str = "SAM3D^TEST") -> dict:
    """`out/0000.dcm...`: slice k of the volume (array index [i, j, k]: column i, row j) with its geometry in LPS.
    Returns the study, series and frame-of-reference UIDs."""
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj).astype(np.int16)
    a = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    row_dir, col_dir = a[:3, 0] / spacing[0], a[:3, 1] / spacing[1]
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    out.mkdir(parents=True, exist_ok=True)
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.PatientName, ds.PatientID, ds.Modality = patient, "sam3d-test", "CT"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "1"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, k + 1, "sam3d test CT"
        ds.ImagePositionPatient = [float(v) for v in (a @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()  # rows j, columns i
        ds.save_as(str(out / f"{k:04d}.dcm"), write_like_original=False)
    return uids


def read_back(folder: Path) -> np.ndarray:
    """The series' voxels as [i, j, k] (the inverse of write_ct_series), for checks."""
    slices = sorted((pydicom.dcmread(str(f)) for f in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    return np.stack([d.pixel_array.T for d in slices], axis=-1)
