"""Exports for devices: splat files (ply / splat / spz / sog / glb / compressed-ply, and readers of
other tools' files) through ``budget3d.export.splats`` (SOG, glTF and compressed.ply in ``sog``,
``gltf`` and ``compressed_ply``, what they share in ``splat_arrays``); the NeLF's ONNX export in
``budget3d.export.onnx``, its int8 / mixed precision in ``quantize`` and running the graphs in
onnxruntime in ``ortrun``; ``pte``, ``web``
and ``bench`` (which measures with ``measure``) beside them. Names are imported on first use, so
``budget3d --help`` (which imports the bench and web modules for their flags) does not load torch."""

_SPLATS = (
    "FILES", "FORMATS", "importance", "load_any", "load_compressed_ply", "load_glb", "load_sog", "load_splat",
    "load_spz", "look_at", "orbit_cameras", "orbit_scores", "read_spz_streams", "reprune", "run_scores", "save_any",
    "save_compressed_ply", "save_glb", "save_sog", "save_splat", "save_spz", "sniff",
)

# The NeLF's ONNX files, by export format (budget3d.export.onnx writes them; bench, web and the viewer find them)
ONNX_FILES = {"onnx": "nelf.onnx", "onnx-int8": "nelf-int8.onnx", "onnx-mixed": "nelf-mixed.onnx"}

__all__ = list(_SPLATS) + ["ONNX_FILES"]


def __getattr__(name):
    if name in _SPLATS:
        from budget3d.export import splats

        return getattr(splats, name)
    raise AttributeError(f"module 'budget3d.export' has no attribute {name!r}")
