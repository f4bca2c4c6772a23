"""MobileR2L NeLF building blocks: rays, encoding, bounds, network sizes and the exact
ConvTranspose -> PixelShuffle conversion. Tiny tensors only."""

import numpy as np
import pytest
import torch
from torch import nn

from budget3d.nelf import rays
from budget3d.nelf.students import r2l as net
from budget3d.scene.camera import Camera, Scene, View


def look_at_w2c(centre, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """OpenCV world-to-camera for a camera at ``centre`` looking at ``target``."""
    c = np.asarray(centre, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - c
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])  # rows: camera axes in world
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ c
    return w2c


def test_camera_rays_known_camera():
    cam = Camera(30.0, 25.0, 12.0, 12.0, 24, 24, look_at_w2c((3.0, -2.0, 1.5), target=(0.2, 0.1, -0.3)))
    o, d = rays.camera_rays(cam, 8)  # 3x3 grid; low-res pixel (1, 1) centre is (12, 12) = (cx, cy)
    assert o.shape == d.shape == (3, 3, 3)
    assert torch.allclose(o, torch.tensor(cam.center, dtype=torch.float32).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, 3), atol=1e-6)
    axis = torch.tensor(cam.world_to_camera[2, :3], dtype=torch.float32)
    assert torch.allclose(d[1, 1], axis, atol=1e-6)
    # every ray projects back onto its low-res pixel centre, in full-res pixels
    w2c = torch.tensor(cam.world_to_camera, dtype=torch.float32)
    p_cam = (o + 2.0 * d) @ w2c[:3, :3].T + w2c[:3, 3]
    u = cam.fx * p_cam[..., 0] / p_cam[..., 2] + cam.cx
    v = cam.fy * p_cam[..., 1] / p_cam[..., 2] + cam.cy
    centres = (torch.arange(3) + 0.5) * 8
    assert torch.allclose(u, centres[None, :].expand(3, 3), atol=1e-4)
    assert torch.allclose(v, centres[:, None].expand(3, 3), atol=1e-4)
    # the torch-only path (for ONNX) gives the same rays
    c2w = torch.linalg.inv(torch.tensor(cam.world_to_camera)).float()
    o2, d2 = rays.rays_from_c2w(c2w, cam.K(), cam.width, cam.height, 8)
    assert torch.allclose(o2, o, atol=1e-6) and torch.allclose(d2, d, atol=1e-6)


def test_encode_shape_and_channel_order():
    o = torch.tensor([[[1.0, 2.0, 3.0]]])  # one ray, (1, 1, 3)
    d = torch.tensor([[[0.0, 0.0, 1.0]]])
    x = rays.encode(o, d, 2.0, 9.0)  # points at t = 2..9, z = 5..12
    assert x.shape == (1, 312, 1, 1)
    pts = torch.tensor([[1.0, 2.0, 5.0 + n] for n in range(8)])  # (k, 3)
    for n in range(8):
        for axis in range(3):
            p = pts[n, axis]
            assert x[0, 3 * n + axis, 0, 0] == pytest.approx(p.item())
            for i in range(6):
                sin_ch, cos_ch = (1 + 2 * i) * 24 + 3 * n + axis, (2 + 2 * i) * 24 + 3 * n + axis
                assert x[0, sin_ch, 0, 0] == pytest.approx(torch.sin(p * 2**i).item(), abs=1e-5)
                assert x[0, cos_ch, 0, 0] == pytest.approx(torch.cos(p * 2**i).item(), abs=1e-5)


def test_encode_per_ray_bounds_and_batch():
    o, d = torch.zeros(2, 3, 3), torch.nn.functional.normalize(torch.randn(2, 3, 3), dim=-1)
    near, far = torch.full((2, 3), 1.0), torch.full((2, 3), 4.0)
    x = rays.encode(o, d, near, far, k=4, freqs=2)
    assert x.shape == (1, 3 * 4 * 5, 2, 3)
    assert torch.allclose(x, rays.encode(o, d, 1.0, 4.0, k=4, freqs=2))
    assert torch.allclose(x[0, 9:12].permute(1, 2, 0), 4.0 * d)  # last point's raw xyz
    assert rays.encode(o[None].expand(2, -1, -1, -1), d[None].expand(2, -1, -1, -1), 1.0, 4.0).shape == (2, 312, 2, 3)


def test_scene_bounds():
    views = []
    for i, a in enumerate(np.linspace(0, 2 * np.pi, 12, endpoint=False)):
        c = 4.0 * np.array([np.cos(a), np.sin(a), 0.5]) / np.sqrt(1.25)
        views.append(View(f"v{i}", Camera(50.0, 50.0, 16.0, 16.0, 32, 32, look_at_w2c(c)), load=lambda: None))
    scene = Scene("blender", "", views, [])
    near, far = rays.scene_bounds(scene)
    r = np.sqrt(3.0) * 4.0 / 3.0  # look_at: centre ~0, half-size distance / 3
    assert near == pytest.approx(4.0 - r, abs=1e-3) and far == pytest.approx(4.0 + r, abs=1e-3)
    scene.near_far = (0.5, 20.0)
    assert rays.scene_bounds(scene) == (0.5, 20.0)


@pytest.mark.parametrize("preset,scale", [("mobile-r2l", 8), ("mobile-int8", 8), ("small", 4), ("tiny", 4)])
def test_presets_forward(preset, scale):
    model = net.build(preset).eval()
    assert model.scale == scale
    with torch.no_grad():
        y = model.decode(torch.randn(1, 312, 2, 3))
    assert y.shape == (1, 3, 2 * scale, 3 * scale)
    assert y.min() >= 0 and y.max() <= 1
    assert net.describe(model).startswith(f"{preset}: ")


def test_param_counts():
    n = {p: net.count_params(net.build(p)) for p in net.PRESETS}
    assert 3.8e6 < n["mobile-r2l"] < 4.6e6
    assert n["tiny"] < n["small"] < n["mobile-r2l"] / 5


def test_macs_match_hand_count():
    # in 6 -> width 4 (1 block) -> convT 4->2 -> RGB, at 8x8 output (4x4 rays)
    m = net.NeLF(in_ch=6, width=4, n_blocks=1, act="relu", sr="convT", sr_channels=(2,))
    px = 16
    head, block, up, tail = 6 * 4 * px, 2 * 4 * 4 * px, 4 * 2 * 16 * px, 2 * 3 * 64
    assert net.macs_per_frame(m, 8, 8) == head + block + up + tail
    m = net.NeLF(in_ch=6, width=4, n_blocks=1, act="relu", sr="pixelshuffle", sr_channels=(2,))
    assert net.macs_per_frame(m, 8, 8) == head + block + 8 * 4 * 9 * px + tail
    assert "M params" in net.describe(m, 8, 8)


def test_convT_to_pixelshuffle_exact():
    torch.manual_seed(0)
    convT = nn.ConvTranspose2d(16, 8, 4, 2, 1)
    ps = net.convT_to_pixelshuffle(convT)
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        assert torch.allclose(convT(x), ps(x), atol=1e-5)


def test_convert_whole_model_exact():
    torch.manual_seed(0)
    m = net.NeLF(in_ch=12, width=8, n_blocks=2, act="gelu", sr="convT", sr_channels=(6, 6, 4))
    for bn in m.modules():  # non-trivial running stats, so eval-mode BN matters
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(1, 12, 3, 4)
    with torch.no_grad():
        before = m.decode(x)
        net.convert_to_pixelshuffle(m)
        after = m.decode(x)
    assert not any(isinstance(mod, nn.ConvTranspose2d) for mod in m.modules())
    assert before.shape == (1, 3, 24, 32)
    assert torch.allclose(before, after, atol=1e-5)
    # the converted paper net has the int8 preset's layout (state_dict loads into it)
    big = net.convert_to_pixelshuffle(net.build("mobile-r2l"))
    net.build("mobile-int8").load_state_dict(big.state_dict())


def test_linear_output_is_clamped_only_in_eval():
    from budget3d.nelf.students.r2l import LinearClamp

    f = LinearClamp()
    z = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    f.train()
    y = f(z)
    assert torch.equal(y, z)
    y.sum().backward()  # the gradient never vanishes, however far a value overshoots
    assert torch.equal(z.grad, torch.ones(3))
    f.eval()
    assert f(z).tolist() == [0.0, 0.25, 1.0]
