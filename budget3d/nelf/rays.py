"""Rays and the MobileR2L input encoding: one ray per low-resolution pixel, K points along it,
positionally encoded into an NCHW "image" the 1x1-conv network reads.

Everything on the per-frame path (``rays_from_c2w``, ``encode``) is plain torch ops
(matmul, arange, stack, sin/cos), so a later ONNX export can take a pose and intrinsics as input.
"""

from __future__ import annotations

import numpy as np
import torch

from budget3d.scene.camera import Camera, Scene


def rays_from_c2w(c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, scale: int):
    """(origins, unit directions), each (height // scale, width // scale, 3), world coordinates.

    ``c2w`` is a 4x4 camera-to-world matrix (OpenCV axes: x right, y down, z forward), ``K`` the
    3x3 intrinsics of the full-resolution ``width`` x ``height`` image. Low-res pixel (i, j)
    covers ``scale`` x ``scale`` full-res pixels; its ray goes through their centre,
    ((j + 0.5) * scale, (i + 0.5) * scale) in full-res pixel coordinates."""
    if c2w.dim() == 3:  # a batch of cameras (B, 4, 4) with intrinsics (B, 3, 3): (B, h, w, 3) each
        return tuple(torch.stack(t) for t in zip(*(rays_from_c2w(c, k, width, height, scale)
                                                  for c, k in zip(c2w, K))))
    h, w = height // scale, width // scale
    dtype, device = c2w.dtype, c2w.device
    u = (torch.arange(w, dtype=dtype, device=device) + 0.5) * scale
    v = (torch.arange(h, dtype=dtype, device=device) + 0.5) * scale
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    # the camera ray (x, y, 1) rotated to the world as a sum of R's columns: no (h, w, 3) grid
    # constant, so an exported graph stays small at any resolution
    R = c2w[:3, :3]
    d = x[None, :, None] * R[:, 0] + y[:, None, None] * R[:, 1] + R[:, 2]  # (h, w, 3)
    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    o = c2w[:3, 3].expand(h, w, 3)
    return o, d


def camera_rays(camera: Camera, scale: int, device="cpu", dtype=torch.float32):
    """``rays_from_c2w`` for a ``Camera`` (inverts its world_to_camera in float64 first)."""
    c2w = torch.as_tensor(np.linalg.inv(np.asarray(camera.world_to_camera, dtype=np.float64)))
    return rays_from_c2w(c2w.to(device, dtype), camera.K(device, dtype), camera.width, camera.height, scale)


def encode(origins: torch.Tensor, directions: torch.Tensor, near, far, k: int = 8, freqs: int = 6):
    """Positional encoding of ``k`` points per ray in the rays' own coordinates, as an NCHW tensor
    (B, 3*k*(2*freqs+1), h, w). A student encodes its frame's points instead (``Frame.sample``
    then ``embed``): raw world coordinates are NeRF's encoding only within a few units.

    ``origins``/``directions`` are (h, w, 3) (-> B = 1) or (B, h, w, 3); ``near``/``far`` are
    scalars or per-ray tensors shaped like the rays without the last axis. Points sit at
    t = near + (far - near) * n / (k - 1), n = 0..k-1 (both ends included, as R2L samples)."""
    near = torch.as_tensor(near, dtype=origins.dtype, device=origins.device)
    far = torch.as_tensor(far, dtype=origins.dtype, device=origins.device)
    steps = torch.arange(k, dtype=origins.dtype, device=origins.device) / max(k - 1, 1)
    t = near[..., None] + (far - near)[..., None] * steps  # (..., h, w, k)
    return embed(origins[..., None, :] + t[..., None] * directions[..., None, :], freqs)


def embed(pts: torch.Tensor, freqs: int = 6) -> torch.Tensor:
    """NeRF's embedder of points (..., h, w, k, 3) as an NCHW tensor (B, 3*k*(2*freqs+1), h, w).

    Channel order (over the flattened points p, 3k values per ray):
    [p, sin(2^0 p), cos(2^0 p), sin(2^1 p), cos(2^1 p), ...], where p lists point n's
    x, y, z at 3n, 3n+1, 3n+2. So channel = b * 3k + 3n + axis, with block b = 0 for the raw
    coordinates and b = 1 + 2i (sin) / 2 + 2i (cos) for frequency i."""
    p = pts.flatten(-2)  # (..., h, w, 3k)
    bands = [p]
    for i in range(freqs):
        bands += [torch.sin(p * 2.0**i), torch.cos(p * 2.0**i)]
    x = torch.cat(bands, dim=-1).movedim(-1, -3)  # (..., C, h, w)
    return x if x.dim() == 4 else x[None]


def scene_bounds(scene: Scene) -> tuple[float, float]:
    """(near, far) for ``encode``: the points must cover what the teacher shows.

    Scenes whose format gives bounds (LLFF's forward-facing captures) use ``scene.near_far``.
    Otherwise the cameras look at one region (``Scene.look_at``: centre c, half-size r); its
    bounding sphere has radius sqrt(3) r, so near = min camera distance to c minus that radius
    (at least 5% of the distance, to stay in front of the camera), far = max distance plus it.
    For Blender scenes (cameras ~4 units from the object) this gives about (1.7, 6.4), R2L's (2, 6)."""
    if scene.near_far is not None:
        return float(scene.near_far[0]), float(scene.near_far[1])
    centre, half = scene.look_at()
    cams = [v.camera for v in scene.train + scene.test]
    dist = np.linalg.norm(np.stack([c.center for c in cams]) - centre, axis=1)
    radius = float(np.sqrt(3.0) * half)
    return max(float(dist.min()) - radius, 0.05 * float(dist.min())), float(dist.max()) + radius
