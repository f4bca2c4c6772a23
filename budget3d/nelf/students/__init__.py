"""Student kinds, one file each, behind one small interface.

- ``r2l`` (``students/r2l.py``): MobileR2L: K points per ray, positionally encoded, a deep
  1x1-conv MLP, PixelShuffle / ConvTranspose super-resolution. Paper parity; slow to learn.
- ``grid`` (``students/grid.py``): learnable feature grids where the ray meets the surface, a
  small 1x1-conv decoder and the same PixelShuffle super-resolution. Learns in CPU-minutes.

What every student offers the distiller and the exporters:
- ``model(c2w (B, 4, 4), K (B, 3, 3), width, height)`` -> (B, 3, height, width): plain torch
  ops, so one ONNX graph goes from the pose (world units) to the image;
- ``model.frame`` (``nelf/frame.py``: the scale-free coordinates its points are in),
  ``model.scale`` (the ray grid is at 1/scale of the output), ``model.arch``, ``model.kind``;
- ``lr_groups(lr, grid_lr, weight_decay)``, ``macs_per_frame(h, w)``;
- ``needs_geometry``: True when the student also learns from the teacher's depth and alpha
  (``geometry_loss(target)``) and starts from its surfaces (``seed_density(points, weights)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from budget3d.errors import UserError
from budget3d.nelf.frame import Frame
from budget3d.nelf.students import r2l

# preset -> (kind, the kind's settings)
GRID_PRESETS = {
    # a 64^3 density atlas, three feature tri-planes (64, 128, 256), x4 SR
    "grid-small": {},
    # for phones: smaller planes (32, 64, 128) and atlas (48^3): a file under 5 MB
    "grid-mobile": dict(density_res=48, fine_res=(32, 64, 128)),
}
PRESETS = {**{name: "r2l" for name in r2l.PRESETS}, **{name: "grid" for name in GRID_PRESETS}}

# per kind: the peak learning rate of the decoder (grid) / the whole network (r2l)
LR = {"r2l": 3e-3, "grid": 1e-2}


def build(preset: str, arch: dict = None, frame: Frame = None, n_points: int = 8, freqs: int = 6) -> torch.nn.Module:
    """The preset's student (``arch``: a student.pt's record, so a student rebuilds as distilled;
    ``frame``: its input frame, default the identity)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown NeLF preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if PRESETS[preset] == "r2l":
        return r2l.build(preset, arch=arch, frame=frame, n_points=n_points, freqs=freqs)
    from budget3d.nelf.students.grid import GridStudent

    model = GridStudent(frame, **(arch if arch is not None else GRID_PRESETS[preset]))
    model.preset = preset
    return model


def saved_arch(arch, preset: str) -> dict:
    """The network fields a student was distilled with: its saved record (older r2l files lack
    ``block`` and ``out_act``: they were all "add" and "sigmoid"), or the preset's fields as they
    were before records."""
    if PRESETS[preset] == "grid":
        return dict(arch) if arch is not None else None
    arch = dict(arch) if arch is not None else {k: v for k, v in r2l.PRESETS[preset].items()
                                                if k not in ("block", "out_act")}
    arch["sr_channels"] = tuple(arch["sr_channels"])
    return arch  # ``build`` fills the missing fields with the old defaults


def from_payload(p: dict) -> torch.nn.Module:
    """The student a student.pt (or a distillation checkpoint) describes, with its weights."""
    frame = Frame.from_json(p.get("frame"), p.get("near"), p.get("far"))
    model = build(p["preset"], arch=saved_arch(p.get("arch"), p["preset"]), frame=frame,
                  n_points=p.get("n_points", 8), freqs=p.get("freqs", 6))
    state = {k: v for k, v in p["state_dict"].items() if k != "centre"}  # grid files before frames kept it here
    model.load_state_dict(state)
    return model


def load_student(path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, payload) from a student.pt written by ``distill``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; distill the run first (budget3d distill RUN)")
    try:
        p = torch.load(path, map_location="cpu", weights_only=False)
        model = from_payload(p)
    except Exception as e:
        raise UserError(f"{path}: not a readable NeLF student ({type(e).__name__}); distill the run again") from None
    return model.eval(), p


def payload(model, **extra) -> dict:
    """What rebuilds ``model`` (``from_payload``) without the teacher or the scene."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "preset": model.preset,
            "kind": model.kind, "arch": dict(model.arch), "frame": model.frame.to_json(), "in_ch": model.in_ch,
            "scale": model.scale, "n_points": getattr(model, "n_points", 8), "freqs": getattr(model, "freqs", 6),
            **extra}


count_params = r2l.count_params

__all__ = ["GRID_PRESETS", "LR", "PRESETS", "build", "count_params", "from_payload", "load_student", "payload",
           "saved_arch"]
