"""Exports for devices: splat files (ply / splat / spz, and readers of other tools' files) here;
the NeLF's ONNX export lives in ``budget3d.export.onnx`` (imported on demand)."""

from budget3d.export.splats import (
    FORMATS, importance, load_any, load_compressed_ply, load_splat, load_spz, look_at, orbit_cameras, orbit_scores,
    read_spz_streams, reprune, run_scores, save_any, save_splat, save_spz, sniff,
)

__all__ = [
    "FORMATS", "importance", "load_any", "load_compressed_ply", "load_splat", "load_spz", "look_at", "orbit_cameras",
    "orbit_scores", "read_spz_streams", "reprune", "run_scores", "save_any", "save_splat", "save_spz", "sniff",
]
