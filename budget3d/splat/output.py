"""What ``render`` returns, on every backend: ``RenderOutput``, and ``finish``, which builds it from
a backend's composited channels (colour, depth, extra)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


@dataclass
class RenderOutput:
    image: torch.Tensor  # (H, W, 3)
    alpha: torch.Tensor  # (H, W, 1)
    depth: torch.Tensor  # (H, W, 1) expected camera z (0 where nothing was drawn)
    extra: Optional[torch.Tensor]  # (H, W, K) extra channels, background 0
    means2d: torch.Tensor  # projected centres ((N,2); (1,N,2) on cuda), retain_grad: see means2d_grad()
    radii: torch.Tensor  # (N, 2) int32 box half-extents, 0 = not visible
    counts: Union[torch.Tensor, Callable[[], torch.Tensor]]  # n_pixels, or how to count them on first use
    depths: torch.Tensor  # (N,) camera-space z of each Gaussian

    @property
    def n_pixels(self) -> torch.Tensor:
        """(N,) pixels each Gaussian was composited into. The cuda backend counts them only when
        asked (a second pass over gsplat's tiles), since only the score views need them."""
        if callable(self.counts):
            self.counts = self.counts()
        return self.counts

    @property
    def visible(self) -> torch.Tensor:
        return (self.radii > 0).any(-1)

    def means2d_grad(self) -> Optional[torch.Tensor]:
        """(N, 2) gradient of the loss w.r.t. the projected centres, after backward."""
        g = self.means2d.grad
        return None if g is None else g.reshape(-1, 2)


def finish(img, alpha, means2d, radii, n_pixels, depths, has_extra) -> RenderOutput:
    """``img`` (H, W, 4 + K): colour, alpha-weighted depth, then the K extra channels."""
    depth = img[..., 3:4] / alpha.clamp_min(1e-10)
    depth = torch.where(alpha > 0, depth, torch.zeros_like(depth))
    return RenderOutput(
        image=img[..., :3],
        alpha=alpha,
        depth=depth,
        extra=img[..., 4:] if has_extra else None,
        means2d=means2d,
        radii=radii,
        counts=n_pixels,
        depths=depths,
    )
