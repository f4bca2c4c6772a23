"""The student's scale-free input frame (nelf/frame.py) and the teacher's crop renders.

Structure from motion gives every processed scene an arbitrary scale; before the frame, the same
scene with its world x20 distilled 3.6 dB worse. Here the tiny 360° scene of test_train and an
LLFF-like forward-facing wall are written at several world scales (cameras, bounds and the
teacher's Gaussians scaled; images identical) and distilled side by side."""

import json
import math

import numpy as np
import pytest
import torch

from budget3d.nelf.distill import distill, setup
from budget3d.nelf.frame import Frame, ndc_frame
from budget3d.scene.camera import Camera
from budget3d.splat import load_ply, render, save_ply
from test_distill import cfg_for, make_run
from test_train import wall_gaussians

STEPS = 120


def scale_gaussians(g: dict, s: float) -> dict:
    g = {k: v.clone() for k, v in g.items()}
    g["means"] *= s
    g["scales"] += math.log(s)
    return g


def scaled_run(root, s: float):
    """test_distill's run folder with its world scaled by ``s`` (camera centres, points, teacher)."""
    run = make_run(root)
    scene = json.loads((run / "config.json").read_text())["data"]
    for split in ("train", "test"):
        path = f"{scene}/transforms_{split}.json"
        d = json.loads(open(path).read())
        for f in d["frames"]:
            m = np.asarray(f["transform_matrix"])
            m[:3, 3] *= s
            f["transform_matrix"] = m.tolist()
        open(path, "w").write(json.dumps(d))
    save_ply(scale_gaussians(load_ply(run / "gaussians.ply"), s), run / "gaussians.ply")
    return run


def forward_facing_run(root, s: float = 1.0, size: int = 32, n_views: int = 12):
    """An LLFF run folder (poses_bounds.npy, images/) of the wall seen from a 4x3 grid of cameras
    looking down +z, world scaled by ``s``; the wall's Gaussians are the teacher."""
    import cv2

    truth = wall_gaussians()
    scene = root / "scene"
    (scene / "images").mkdir(parents=True)
    rows = []
    for i in range(n_views):
        c = np.array([0.3 * (i % 4) - 0.45, 0.3 * (i // 4) - 0.3, 0.0])
        w2c = np.eye(4)
        w2c[:3, 3] = -c
        cam = Camera(size * 1.0, size * 1.0, size / 2, size / 2, size, size, w2c)
        with torch.no_grad():
            img = render(truth, cam, backend="torch", background=torch.ones(3)).image
        cv2.imwrite(str(scene / "images" / f"{i:03d}.png"),
                    cv2.cvtColor((img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR))
        # LLFF columns: down, right, back, centre, (h, w, focal)
        pose = np.stack([[0, 1, 0], [1, 0, 0], [0, 0, -1], c * s, [size, size, size]], 1)
        rows.append(np.concatenate([pose.reshape(-1), [3.5 * s, 6.5 * s]]))
    np.save(scene / "poses_bounds.npy", np.asarray(rows))
    run = root / "run"
    run.mkdir()
    save_ply(scale_gaussians(truth, s), run / "gaussians.ply")
    (run / "config.json").write_text(json.dumps({"data": str(scene), "downscale": 1, "sh_degree": 1}))
    return run


# ----------------------------------------------------------------------------- the frames themselves


def test_ndc_frame_maps_the_reference_image_to_the_unit_square_and_keeps_rays_straight():
    cams = [Camera(40.0, 30.0, 16.0, 12.0, 32, 24, np.eye(4))]
    f = ndc_frame(cams, near=2.0, far=10.0)
    assert f.kind == "ndc" and f.t0 == -1.0 and f.t1 == pytest.approx(1 - 2 * 0.75 * 2.0 / 10.0)
    # the image corners at any depth are (+-1, +-1); depth z = n is -1, z -> infinity is 1
    for z in (1.5, 4.0, 1e6):
        x = torch.tensor([[16 / 40 * z, 12 / 30 * z, z], [-16 / 40 * z, -12 / 30 * z, z]])
        p = f.points(x)
        assert torch.allclose(p[:, :2], torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), atol=1e-5)
        assert p[0, 2].item() == pytest.approx(1 - 2 * f.n / z, abs=1e-5)
    # a ray's points in NDC are P0 + t V, at the NDC depth t, and param() inverts distance -> t
    o = torch.tensor([[0.3, -0.2, 0.1]])
    d = torch.nn.functional.normalize(torch.tensor([[0.2, 0.1, 1.0]]), dim=-1)
    p0, v, _, _ = f.segment(o, d)
    for dist in (2.0, 5.0, 30.0):
        world = o + dist * d
        t = f.param(o, d, torch.tensor([dist]))
        assert torch.allclose(p0 + t[:, None] * v, f.points(world), atol=1e-4)


def test_frames_are_scale_free():
    """The same rays in a world scaled x20 give the same frame points, for both kinds."""
    from budget3d.nelf.frame import ball_frame

    cams = [Camera(40.0, 40.0, 16.0, 16.0, 32, 32, w2c) for w2c in (np.eye(4), np.diag([1.0, 1.0, 1.0, 1.0]))]
    cams[1].world_to_camera[:3, 3] = [-0.4, 0.1, 0.0]
    g = torch.Generator().manual_seed(0)
    o = torch.randn(5, 3, generator=g) * 0.3
    d = torch.nn.functional.normalize(torch.randn(5, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    for make in (lambda s: ndc_frame(scaled(cams, s), 2.0 * s, 9.0 * s),
                 lambda s: ball_frame([0.1 * s, 0.0, 5.0 * s], 1.5 * s, 2.0 * s, 9.0 * s)):
        a, b = make(1.0), make(20.0)
        assert torch.allclose(a.sample(o, d, 8), b.sample(o * 20, d, 8), atol=1e-4)
        x = torch.randn(7, 3, generator=g) + torch.tensor([0.0, 0.0, 5.0])
        assert torch.allclose(a.points(x), b.points(x * 20), atol=1e-4)
        rec = Frame.from_json(json.loads(json.dumps(b.to_json())))
        assert torch.allclose(rec.sample(o * 20, d, 8), b.sample(o * 20, d, 8))


def scaled(cams, s):
    out = []
    for c in cams:
        w2c = np.asarray(c.world_to_camera, np.float64).copy()
        w2c[:3, 3] *= s
        out.append(Camera(c.fx, c.fy, c.cx, c.cy, c.width, c.height, w2c))
    return out


# ----------------------------------------------------------------------------- distillation at any scale


@pytest.mark.parametrize("preset", ["small", "grid-small"])
def test_a_scaled_world_distils_the_same(tmp_path, preset):
    """The bundled-like tiny scene at scale 1, x20 and x0.05 reaches the same PSNR against its
    teacher at equal steps (within 0.3 dB); raw world coordinates lost 3.6 dB at x20."""
    scales = (1.0, 20.0, 0.05) if preset == "small" else (1.0, 20.0)
    kw = dict(preset=preset, iters=STEPS, batch=4, crop=16) if preset == "small" else \
        dict(preset=preset, lr=None, iters=STEPS // 2, batch=8, crop=16)
    got = {}
    for s in scales:
        run = scaled_run(tmp_path / f"s{s}", s)
        m = distill(cfg_for(run, **kw), progress=False)
        assert m["frame"] == "ball"
        got[s] = m["student_vs_teacher_psnr"]
    assert got[1.0] > 14, got  # it learns at all
    for s in scales[1:]:
        assert abs(got[s] - got[1.0]) < 0.3, got


def test_forward_facing_scene_distils_in_ndc_at_any_scale(tmp_path):
    """A forward-facing capture is distilled in NDC; x20 changes nothing, and it learns the wall."""
    got = {}
    for s in (1.0, 20.0):
        run = forward_facing_run(tmp_path / f"s{s}", s)
        d = setup(cfg_for(run, preset="small", iters=1))
        assert d.poses.forward_facing and d.model.frame.kind == "ndc"
        # lr 5e-3: at the tests' usual 1e-2 two seeds of this scene end 2 dB apart at 240 steps
        m = distill(cfg_for(run, preset="small", iters=2 * STEPS, batch=4, crop=16, lr=5e-3), progress=False)
        assert m["frame"] == "ndc"
        got[s] = m
    assert abs(got[20.0]["student_vs_teacher_psnr"] - got[1.0]["student_vs_teacher_psnr"]) < 0.3
    m = got[1.0]
    # measured: 26.1 dB against the teacher after 240 steps at x1, 25.9 at x20 (the mean colour: 17.3 vs GT)
    assert m["student_vs_teacher_psnr"] > 23.5, m["student_vs_teacher_psnr"]
    assert m["student_psnr"] > m["mean_colour_psnr"] + 3, m


def test_grid_student_learns_a_forward_facing_scene_in_ndc(tmp_path):
    """The grid student's density and feature grids live in the same NDC cube (seeded from the
    teacher's depth there): measured 26.2 dB against the teacher after 120 steps at x1 (5.95 untrained)."""
    run = forward_facing_run(tmp_path, 20.0)
    m = distill(cfg_for(run, preset="grid-small", lr=None, iters=120, batch=8, crop=16), progress=False)
    assert m["frame"] == "ndc" and m["frame_coverage"]["surfaces_inside"] > 0.99
    assert m["student_vs_teacher_psnr"] > 23.0, m["student_vs_teacher_psnr"]


# ----------------------------------------------------------------------------- the teacher's windows


def test_teacher_renders_windows_equal_to_the_whole_view(tmp_path):
    """When the pool does not fit the cache, windows of jittered poses are rendered alone (a camera
    with a shifted principal point): the same pixels, depth and alpha as the whole view's."""
    run = make_run(tmp_path)
    d = setup(cfg_for(run, preset="grid-small", lr=None, crop=16, cache_size=4))
    t = d.teacher
    assert not t.keep_all
    pose = d.poses.n_train + 5
    spots = ((0, 0), (8, 12), (16, 16))
    wins = [t.window(pose, x0, y0, 16, 16, geometry=True) for x0, y0 in spots]
    assert t.windows == 3 and pose not in t.cache
    img, (depth, alpha) = t.image(pose), t.geometry(pose)  # the whole view
    for (x0, y0), win in zip(spots, wins):
        assert win.shape == (16, 16, 5)
        assert (win[..., :3] - img[y0:y0 + 16, x0:x0 + 16]).abs().max() <= 1.5 / 255
        assert (win[..., 4] - alpha[y0:y0 + 16, x0:x0 + 16]).abs().max() <= 1.5 / 255
        both = alpha[y0:y0 + 16, x0:x0 + 16] > 0.5
        assert torch.allclose(win[..., 3][both], depth[y0:y0 + 16, x0:x0 + 16][both], rtol=2e-3)
    # the first `limit` poses (the training poses first: a quarter of every batch) are kept whole
    t.window(0, 8, 8, 16, 16)
    assert 0 in t.cache and t.windows == 3
    # the distiller's batch: depth as the frame's ray parameter
    gt, cams = d.batch(3, d.poses.batch(3, 4))
    assert gt.shape == (4, 16, 16, 5)
    assert torch.isfinite(gt).all() and (gt[..., 3][gt[..., 4] > 0.5] > 0).all()
