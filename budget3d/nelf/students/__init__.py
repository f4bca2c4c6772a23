"""Student kinds, one file each, behind one small interface.

- ``r2l``: MobileR2L (``budget3d.nelf.net``): K points per ray, positionally encoded, a deep
  1x1-conv MLP, PixelShuffle / ConvTranspose super-resolution. Paper parity; slow to learn.
- ``grid``: learnable feature grids where the ray meets the surface (``students/grid.py``), a
  small 1x1-conv decoder and the same PixelShuffle super-resolution. Learns in CPU-minutes.

What every kind offers the distiller and the exporters:
- ``build(preset, arch=None, frame=None, n_points=8, freqs=6)``: the network (``arch``: a
  student.pt's record, so a student rebuilds as distilled; ``frame``: the grid kind's scene
  centre and radius);
- ``pose_forward(model, c2w, K, width, height, near, far, n_points, freqs)``: (B, 3, H, W)
  images of cameras (B, 4, 4) / (B, 3, 3), plain torch ops, so one ONNX graph goes from the pose
  to the image;
- ``model.scale`` (the ray grid is at 1/scale of the output) and ``model.arch``.
"""

from __future__ import annotations

import torch

from budget3d.nelf import net
from budget3d.nelf.rays import encode, rays_from_c2w

# preset -> (kind, the kind's settings)
GRID_PRESETS = {
    # a 64^3 density atlas, three feature tri-planes (64, 128, 256), x4 SR
    "grid-small": {},
    # for phones: smaller planes (32, 64, 128) and atlas (48^3): a file under 5 MB
    "grid-mobile": dict(density_res=48, fine_res=(32, 64, 128)),
}
PRESETS = {**{name: "r2l" for name in net.PRESETS}, **{name: "grid" for name in GRID_PRESETS}}

# per kind: the peak learning rate of the decoder (grid) / the whole network (r2l)
LR = {"r2l": 3e-3, "grid": 1e-2}


def kind_of(preset_or_model) -> str:
    if isinstance(preset_or_model, str):
        return PRESETS[preset_or_model]
    return getattr(preset_or_model, "kind", "r2l")


def build(preset: str, arch: dict = None, frame=None, n_points: int = 8, freqs: int = 6) -> torch.nn.Module:
    """The preset's student (see the module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown NeLF preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if PRESETS[preset] == "r2l":
        return net.build(preset, in_ch=3 * n_points * (2 * freqs + 1), arch=arch)
    from budget3d.nelf.students.grid import GridStudent

    centre, radius = frame if frame is not None else ((0.0, 0.0, 0.0), 1.0)
    model = GridStudent(centre, radius, **(arch if arch is not None else GRID_PRESETS[preset]))
    model.preset = preset
    return model


def pose_forward(model, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, near: float, far: float,
                 n_points: int, freqs: int) -> torch.Tensor:
    """(B, 3, height, width) images of the cameras c2w (B, 4, 4) with intrinsics K (B, 3, 3)
    (or one camera, unbatched); ``model`` may be wrapped (DDP): its kind is read underneath."""
    inner = getattr(model, "module", model)
    if kind_of(inner) == "grid":
        return model(c2w, K, width, height)
    o, d = rays_from_c2w(c2w, K, width, height, inner.scale)
    return model(encode(o, d, near, far, k=n_points, freqs=freqs))


def lr_groups(model, lr: float, grid_lr: float, weight_decay: float) -> list:
    """AdamW parameter groups: the grids at ``grid_lr`` without weight decay (it would pull every
    texel a ray never reaches to zero), the network at ``lr``. ``lr_scale`` is what the schedule
    multiplies."""
    if kind_of(model) != "grid":
        return [{"params": list(model.parameters()), "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]
    return [{"params": model.net_parameters(), "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay},
            {"params": model.grid_parameters(), "lr": grid_lr, "lr_scale": grid_lr / lr, "weight_decay": 0.0}]


def macs_per_frame(model, h: int, w: int) -> int:
    """Multiply-accumulates of the convs per h x w frame (the grid kind adds its texel reads,
    counted one MAC each)."""
    if kind_of(model) != "grid":
        return net.macs_per_frame(model, h, w)
    from budget3d.nelf.students.grid import lookups_per_frame

    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += out.shape[2] * out.shape[3] * m.out_channels * m.in_channels // m.groups * m.weight[0, 0].numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():  # a real forward (the grid lookups have no meta kernels); ~0.1 s
            dev = model.centre.device
            model(torch.eye(4, device=dev), torch.tensor([[w, 0.0, w / 2], [0.0, w, h / 2], [0.0, 0.0, 1.0]],
                                                         device=dev), w, h)
    finally:
        for k in hooks:
            k.remove()
    return total + lookups_per_frame(model.arch, h, w)


__all__ = ["GRID_PRESETS", "LR", "PRESETS", "build", "kind_of", "lr_groups", "macs_per_frame", "pose_forward"]
