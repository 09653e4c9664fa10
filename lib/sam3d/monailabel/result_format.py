"""The file every infer task answers with, in the format the client asks for (one place for all tasks).

MONAI Label's clients say what they can read in the request's params:

    result_extension  ".nii.gz" (the default: what Slicer's client reads) | ".nii" | ".nrrd" | ".seg.nrrd" | ".mha"
    result_dtype      the voxel type: "uint8" | "int8" | "uint16" | "int16" | "uint32" | "int32" | "float32";
                      default: the mask's own (uint8)
    result_compress   true: gzip inside the file (.nrrd, .mha); default false (.nii.gz is always compressed)

OHIF's MONAI Label panel sends `{"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": false}`
and parses the answer as NRRD: answering .nii.gz there draws nothing. DICOM SEG is MONAI Label's `output=dicom_seg`
(a DICOMweb datastore and `label_info`): it converts the file written here.

The file is written by the functions of MONAI Label's own `monailabel.transform.writer.Writer` (NIfTI through
nibabel, the image's affine exactly; NRRD and MHA through ITK, in LPS space) to a temporary file named after the
task, which MONAI Label deletes once sent. A bad
value is the client's mistake: HTTP 422 before any model work (`ResultFormat.from_request`).
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import HTTPException

EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
DEFAULT_EXTENSION = ".nii.gz"
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def _bad(key: str, value, allowed: str) -> HTTPException:
    return HTTPException(status_code=422, detail=f"{key} must be {allowed}, got {str(value)[:64]!r}")


@dataclass(frozen=True)
class ResultFormat:
    extension: str = DEFAULT_EXTENSION
    dtype: str | None = None  # None: the mask's own
    compress: bool = False

    @classmethod
    def from_request(cls, request: dict) -> "ResultFormat":
        """The format a request asks for; HTTPException 422 for a value this server cannot write."""
        ext = request.get("result_extension")
        if ext is None or ext == "":
            ext = DEFAULT_EXTENSION
        if not isinstance(ext, str):
            raise _bad("result_extension", ext, " | ".join(EXTENSIONS))
        ext = ext.strip().lower()
        ext = ext if ext.startswith(".") else f".{ext}"
        if ext not in EXTENSIONS:
            raise _bad("result_extension", ext, " | ".join(EXTENSIONS))

        dtype = request.get("result_dtype")
        if dtype in (None, ""):
            dtype = None
        elif not isinstance(dtype, str) or dtype.strip().lower() not in DTYPES:
            raise _bad("result_dtype", dtype, " | ".join(DTYPES))
        else:
            dtype = dtype.strip().lower()

        compress = request.get("result_compress", False)
        if isinstance(compress, str) and compress.strip().lower() in TRUE + FALSE:
            compress = compress.strip().lower() in TRUE
        elif compress is None:
            compress = False
        elif not isinstance(compress, (bool, int)) or isinstance(compress, int) and compress not in (0, 1):
            raise _bad("result_compress", compress, "true or false")
        return cls(ext, dtype, bool(compress))

    def check_fits(self, mask: np.ndarray) -> None:
        """HTTPException 422 when the label values do not fit the asked voxel type (they would wrap around)."""
        if self.dtype is None or self.dtype.startswith("float") or mask.size == 0:
            return
        info = np.iinfo(self.dtype)
        lo, hi = int(mask.min()), int(mask.max())
        if lo < info.min or hi > info.max:
            raise HTTPException(
                status_code=422,
                detail=f"result_dtype {self.dtype} cannot hold the label values "
                f"{lo}..{hi}: ask for a wider type (e.g. uint16)",
            )

    def write(self, mask: np.ndarray, affine: np.ndarray, prefix: str = "sam3d_") -> str:
        """`mask` (the image array's shape) with the image's `affine` (RAS, as LoadImage reports it), written in
        this format to a temporary file (MONAI Label sends it, then deletes it); its path. Nothing is left behind
        when writing fails."""
        # MONAI Label's Writer's own functions (its class picks an anonymous temporary name we could not clean up)
        from monailabel.transform.writer import write_itk, write_nifti  # imports ITK: only when a task answers

        self.check_fits(mask)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=self.extension)
        os.close(fd)
        try:
            if self.extension in (".nii.gz", ".nii"):  # nibabel: the affine exactly as given, oblique included
                write_nifti(
                    np.asarray(mask),
                    path,
                    affine=np.asarray(affine, np.float64),
                    output_dtype=np.dtype(self.dtype or mask.dtype),
                )
            else:  # ITK: NRRD / MHA in LPS space, `compress` honoured
                write_itk(np.asarray(mask), path, np.asarray(affine, np.float64), self.dtype, self.compress)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        return path
