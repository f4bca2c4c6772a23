"""Gaussians and the one renderer API (see render.py for the backends)."""

from budget3d.splat.gaussians import PARAM_KEYS, init_from_points, load_ply, random_init, save_ply
from budget3d.splat.project import num_sh_bases, project, sh_to_rgb
from budget3d.splat.output import RenderOutput
from budget3d.splat.render import BACKENDS, render

__all__ = [
    "BACKENDS", "PARAM_KEYS", "RenderOutput", "init_from_points", "load_ply", "num_sh_bases", "project",
    "random_init", "render", "save_ply", "sh_to_rgb",
]
