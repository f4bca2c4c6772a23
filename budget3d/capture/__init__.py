"""From a folder of photos or a video to a COLMAP scene folder (``budget3d process``).

- ``inputs``: what the user gave: photos (decoded, EXIF orientation applied, checked) or a video
  (the sharpest frame of each window), staged as plain images for SfM;
- ``sfm``: pycolmap structure from motion (SIFT, matching, mapping, undistortion to pinhole);
- ``build``: the command (``process``): build in a temporary folder, write ``images/``, ``sparse/0``,
  ``images_N/``, ``masks/`` and ``process.json``, then rename it into place.

``budget3d.scene`` reads the result as any COLMAP scene; ``budget3d train --data PHOTOS|VIDEO``
runs ``process`` first (``maybe_process``).
"""

_WHERE = {"capture_kind": "inputs", "ProcessOptions": "build", "maybe_process": "build", "process": "build"}

__all__ = sorted(_WHERE)


def __getattr__(name):  # names load on first use: the CLI builds its parser without cv2 or pycolmap
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"budget3d.capture.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'budget3d.capture' has no attribute {name!r}")
