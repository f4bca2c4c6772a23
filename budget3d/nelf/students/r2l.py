"""The MobileR2L student (kind ``r2l``) and the tools to size and convert it.

Per low-resolution pixel a ray, K points along it in the student's frame (``nelf/frame.py``),
positionally encoded (``rays.embed``); the body is a stack of 1x1 convs (an MLP per ray, but as
convs so mobile runtimes run it as one image), then super-resolution stages upsample x2 each to
the output.
The paper upsamples with ConvTranspose2d, which has no int8 kernel on common runtimes; the
"pixelshuffle" variant (3x3 conv to 4x channels + PixelShuffle) quantises well, and
``convert_to_pixelshuffle`` turns a trained paper model into it exactly, without retraining.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from budget3d.nelf.frame import Frame

ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}

PRESETS = {
    # the paper's net (~4.1 M params, x8): GELU and ConvTranspose2d SR
    "mobile-r2l": dict(width=256, n_blocks=28, act="gelu", sr="convT", sr_channels=(64, 64, 16)),
    # same size, built for int8: ReLU (fuses into int8 convs), PixelShuffle SR, ResNet blocks
    # relu(x + f(x)) and a linear RGB output (docs/export.md, "Quality of int8")
    "mobile-int8": dict(width=256, n_blocks=28, act="relu", sr="pixelshuffle", sr_channels=(64, 64, 16),
                        block="post", out_act="linear"),
    # laptop-CPU sizes (x4): quick to distil and to run at 1 thread
    "small": dict(width=96, n_blocks=4, act="relu", sr="pixelshuffle", sr_channels=(32, 16)),
    "tiny": dict(width=48, n_blocks=2, act="relu", sr="pixelshuffle", sr_channels=(16, 8)),
}


class ResBlock(nn.Module):
    """1x1 conv + BN + act, twice, with an identity skip.

    block="add": x + f(x), f ending in the activation (the first presets).
    block="post": act(x + f(x)), f ending in the second BN (ResNet's block); the activation fuses
    into the int8 add. On a 28-block student (1,500 CPU steps, bundled scene) it trained to
    22.39 dB against the teacher vs 21.76 for "add"; it did not by itself fix int8 (the sigmoid
    output did, see ``LinearClamp``)."""

    def __init__(self, width: int, act: str, block: str = "add"):
        super().__init__()
        if block not in ("add", "post"):
            raise ValueError(f"unknown residual block {block!r}: expected 'add' or 'post'")
        layers = []
        for _ in range(2):
            layers += [nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), ACTS[act]()]
        self.f = nn.Sequential(*layers[:-1]) if block == "post" else nn.Sequential(*layers)
        self.post = ACTS[act]() if block == "post" else nn.Identity()

    def forward(self, x):
        return self.post(x + self.f(x))


def sr_stage(cin: int, cout: int, sr: str, act: str) -> nn.Sequential:
    """One x2 upsampling stage. "convT" is the paper's; "pixelshuffle" has an int8 kernel."""
    if sr == "convT":
        up = [nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
    elif sr == "pixelshuffle":  # the activation before the shuffle (they commute): it fuses into the int8 conv
        return nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1), ACTS[act](), nn.PixelShuffle(2))
    else:
        raise ValueError(f"unknown super-resolution kind {sr!r}: expected 'convT' or 'pixelshuffle'")
    return nn.Sequential(*up, ACTS[act]())


class LinearClamp(nn.Module):
    """The identity while training, clamped to [0, 1] in eval mode: a linear RGB output.

    A sigmoid's gradient vanishes once a logit overshoots, so nothing pulls it back: a 28-block
    student ended with logits up to ~800 and super-resolution activations in the thousands, which
    left uint8 steps too coarse for every other pixel (int8 lost 5.4-5.7 dB, with a plain or a
    padded sigmoid alike). A linear output keeps its gradient, so values stay near [0, 1]."""

    def forward(self, x):
        return x if self.training else x.clamp(0.0, 1.0)


OUT_ACTS = {"sigmoid": nn.Sigmoid, "linear": LinearClamp, "none": nn.Identity}


class NeLF(nn.Module):
    """``forward(c2w (B, 4, 4), K (B, 3, 3), width, height)`` -> (B, 3, height, width): rays at
    1/scale of the output (scale = 2 ** len(sr_channels)), ``n_points`` points each in ``frame``,
    encoded with ``freqs`` frequencies, then ``decode``: encoded rays (B, in_ch, h, w) -> RGB."""

    kind = "r2l"
    needs_geometry = False  # no teacher depth/alpha loss, no density to seed

    def __init__(self, in_ch=312, width=256, n_blocks=28, act="gelu", sr="convT", out_act="sigmoid",
                 sr_channels=(64, 64, 16), block="add", frame: Frame = None, n_points: int = 8, freqs: int = 6):
        super().__init__()
        self.frame = frame if frame is not None else Frame()
        self.n_points, self.freqs = int(n_points), int(freqs)
        self.head = nn.Sequential(nn.Conv2d(in_ch, width, 1), ACTS[act]())
        self.body = nn.Sequential(*[ResBlock(width, act, block) for _ in range(n_blocks)])
        chans = (width, *sr_channels)
        self.sr = nn.Sequential(*[sr_stage(a, b, sr, act) for a, b in zip(chans[:-1], chans[1:])])
        self.tail = nn.Conv2d(chans[-1], 3, 1)
        if out_act not in OUT_ACTS:
            raise ValueError(f"unknown output activation {out_act!r}: expected one of {', '.join(OUT_ACTS)}")
        self.out_act = OUT_ACTS[out_act]()
        self.in_ch = in_ch
        self.scale = 2 ** len(sr_channels)  # the ray grid is at 1/scale of the output
        self.preset = "custom"

    def forward(self, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> torch.Tensor:
        from budget3d.nelf.rays import embed, rays_from_c2w

        if c2w.dim() == 2:
            c2w, K = c2w[None], K[None]
        o, d = rays_from_c2w(c2w, K, width, height, self.scale)
        return self.decode(embed(self.frame.sample(o, d, self.n_points), self.freqs))

    def decode(self, x):
        h = self.head(x)
        return self.out_act(self.tail(self.sr(h + self.body(h))))

    def lr_groups(self, lr: float, grid_lr: float, weight_decay: float) -> list:
        """AdamW parameter groups (one: the whole network); ``lr_scale`` is what the schedule multiplies."""
        return [{"params": list(self.parameters()), "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]

    def macs_per_frame(self, h: int, w: int) -> int:
        return macs_per_frame(self, h, w)


def build(preset: str, in_ch: int = None, arch: dict = None, frame: Frame = None, n_points: int = 8,
          freqs: int = 6) -> NeLF:
    """The preset's network; ``arch`` (a student.pt's record of the preset's fields when it was
    distilled) overrides the preset's current fields, so older students rebuild as they were.
    ``in_ch`` defaults to what ``n_points`` and ``freqs`` encode: 3 K (2 L + 1)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown NeLF preset {preset!r}: expected one of {', '.join(PRESETS)}")
    arch = {"block": "add", "out_act": "sigmoid", **(arch if arch is not None else PRESETS[preset])}
    in_ch = 3 * n_points * (2 * freqs + 1) if in_ch is None else in_ch
    model = NeLF(in_ch=in_ch, frame=frame, n_points=n_points, freqs=freqs, **arch)
    model.arch = arch
    model.preset = preset
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_frame(model: NeLF, out_h: int, out_w: int) -> int:
    """Multiply-accumulates of the convs for one out_h x out_w frame (BN, activations, skips
    and PixelShuffle not counted). Conv: Cout * Cin/groups * kh * kw per output pixel;
    ConvTranspose: Cin * Cout/groups * kh * kw per input pixel. Shapes come from a forward
    pass of a copy on the "meta" device, so it costs no compute."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        k = m.weight.shape[2] * m.weight.shape[3]
        if isinstance(m, nn.ConvTranspose2d):
            total += inp[0].shape[2] * inp[0].shape[3] * m.in_channels * m.out_channels // m.groups * k
        else:
            total += out.shape[2] * out.shape[3] * m.out_channels * m.in_channels // m.groups * k

    meta = copy.deepcopy(model).to("meta").eval()
    for m in meta.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    s = getattr(model, "scale", 1)
    with torch.no_grad():
        meta.decode(torch.empty(1, model.in_ch, out_h // s, out_w // s, device="meta"))
    return total


def describe(model: NeLF, h: int = 800, w: int = 800) -> str:
    """e.g. "mobile-r2l: 4.14 M params, 45.4 GMAC per 800x800 frame"."""
    name = getattr(model, "preset", "custom")
    return f"{name}: {count_params(model) / 1e6:.2f} M params, {macs_per_frame(model, h, w) / 1e9:.1f} GMAC per {w}x{h} frame"


def convT_to_pixelshuffle(convT: nn.ConvTranspose2d) -> nn.Sequential:
    """A 3x3 conv + PixelShuffle(2) computing exactly what ConvTranspose2d(k=4, s=2, p=1) does.

    In 1D the transposed conv gives out[o] = sum_i in[i] W[o + 1 - 2i]. For output phase
    o = 2m + d that is in[m + t] W[d + 1 - 2t] for the two t with 0 <= d + 1 - 2t <= 3
    (d=0: t in {0, -1}; d=1: t in {0, 1}). A padded 3x3 conv reads in[m + j - 1] at tap j,
    so tap j of phase d holds W[d + 3 - 2j] (zero where out of range). In 2D, phase (dy, dx) of
    output channel c is PixelShuffle's input channel c*4 + dy*2 + dx. The 3x3 conv has 9/4 the
    MACs of the 4x4 transposed conv (5/9 of its taps are zero) but runs on int8 kernels."""
    assert tuple(convT.kernel_size) == (4, 4) and tuple(convT.stride) == (2, 2) and tuple(convT.padding) == (1, 1)
    assert convT.groups == 1 and tuple(convT.dilation) == (1, 1) and tuple(convT.output_padding) == (0, 0)
    W = convT.weight.detach()  # (Cin, Cout, 4, 4)
    cin, cout = W.shape[:2]
    conv = nn.Conv2d(cin, cout * 4, 3, padding=1, bias=convT.bias is not None).to(W.device, W.dtype)
    w3 = torch.zeros(cout, 2, 2, cin, 3, 3, dtype=W.dtype, device=W.device)
    for dy in range(2):
        for dx in range(2):
            for jy in range(3):
                for jx in range(3):
                    ky, kx = dy + 3 - 2 * jy, dx + 3 - 2 * jx
                    if 0 <= ky <= 3 and 0 <= kx <= 3:
                        w3[:, dy, dx, :, jy, jx] = W[:, :, ky, kx].T
    with torch.no_grad():
        conv.weight.copy_(w3.reshape(cout * 4, cin, 3, 3))
        if convT.bias is not None:
            conv.bias.copy_(convT.bias.detach().repeat_interleave(4))
    return nn.Sequential(conv, nn.PixelShuffle(2))


def convert_to_pixelshuffle(model: nn.Module) -> nn.Module:
    """Replace every ConvTranspose2d(k=4, s=2, p=1) in ``model`` (in place) by its exact
    conv + PixelShuffle equivalent, so a trained paper model exports to int8 without retraining.
    Inside an nn.Sequential the two modules are spliced in, so a converted "convT" stage has the
    same layout (and state_dict keys) as a "pixelshuffle" one. Activations are kept."""
    if isinstance(model, nn.Sequential) and any(isinstance(m, nn.ConvTranspose2d) for m in model):
        mods = []
        for m in model:
            mods += list(convT_to_pixelshuffle(m)) if isinstance(m, nn.ConvTranspose2d) else [m]
        model._modules.clear()
        for i, m in enumerate(mods):
            model.add_module(str(i), m)
    for name, child in model.named_children():
        if isinstance(child, nn.ConvTranspose2d):
            setattr(model, name, convT_to_pixelshuffle(child))
        else:
            convert_to_pixelshuffle(child)
    return model
