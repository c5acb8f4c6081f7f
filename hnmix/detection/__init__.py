"""Transfer to detection with detectron2. detectron2 is optional: import it only through require_detectron2()."""

from __future__ import annotations

from hnmix.errors import HnmixError

INSTALL_HINT = ("pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
                "(needs a C++ compiler; CUDA toolkit for GPU ops)")


def require_detectron2() -> None:
    """One clear line instead of an ImportError traceback when detectron2 is missing or broken."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  # its compiled ops: ROIAlign, NMS, COCO eval
    except ImportError as e:
        if getattr(e, "name", None) == "detectron2":
            raise HnmixError(f"transfer-detect needs detectron2, which is not installed: {INSTALL_HINT}") from None
        raise HnmixError(f"detectron2 is installed but does not import ({e}); rebuild it against this torch: "
                         f"{INSTALL_HINT}") from None
