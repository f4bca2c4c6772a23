"""Scenes: posed images (+ sparse points) from Blender, nerfstudio/instant-ngp, COLMAP or LLFF.

``load_scene(path)`` detects the format and returns a ``Scene`` of train/test ``View``s whose
images load lazily; ``describe(scene)`` summarises it (``budget3d inspect``).
"""

from budget3d.scene.camera import Camera, Scene, View
from budget3d.scene.load import describe, detect_format, load_scene

__all__ = ["Camera", "View", "Scene", "load_scene", "describe", "detect_format"]
