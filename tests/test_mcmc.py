"""3DGS-MCMC in torch (budget3d.budget.mcmc): Eq. 9 against a hand-computed case and gsplat's kernel
formula (and its CUDA kernel where there is a GPU), what relocation preserves, dead Gaussians
relocated with their optimizer state restarted, MCMC's add, the noise, and training to exactly the
budget from above and below the initial count on the CPU (the trainer and the CLI)."""

import json
import math

import pytest
import torch

from budget3d.budget import BudgetMCMCStrategy, budget_schedule, compute_relocation
from budget3d.budget.mcmc import inject_noise, relocate, remove_lowest_opacity, sample_add
from budget3d.splat import random_init
from budget3d.train import train
from test_train import tiny_config, tiny_scene


def eq9_loops(o: float, s: float, n: int, n_max: int = 51) -> tuple[float, float]:
    """gsplat's relocation kernel, line by line (RelocationCUDA.cu), in Python floats."""
    n = min(max(n, 1), n_max)
    new_o = 1.0 - (1.0 - o) ** (1.0 / n)
    denom = 0.0
    for i in range(1, n + 1):
        for k in range(i):
            denom += math.comb(i - 1, k) * (-1.0) ** k / math.sqrt(k + 1) * new_o ** (k + 1)
    return new_o, o / denom * s


def test_relocation_hand_case():
    o = torch.tensor([0.75, 0.75, 0.2])
    s = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.1, 0.1, 0.1]])
    new_o, new_s = compute_relocation(o, s, torch.tensor([1, 2, 1]))
    # n = 1: unchanged. n = 2, o = 0.75: o' = 1 - sqrt(0.25) = 0.5;
    # denominator = C(2,1) 0.5 - C(2,2) 0.5^2 / sqrt(2) = 1 - 0.25 / sqrt(2) = 0.8232233
    assert new_o.tolist() == pytest.approx([0.75, 0.5, 0.2], abs=1e-7)
    assert new_s[0].tolist() == pytest.approx([1.0, 2.0, 0.5], rel=1e-6)
    assert new_s[1].tolist() == pytest.approx([0.911053 * x for x in (1.0, 2.0, 0.5)], rel=1e-5)
    assert new_s[2].tolist() == pytest.approx([0.1] * 3, rel=1e-6)


def test_relocation_equals_the_kernel_formula_and_preserves_the_composite():
    g = torch.Generator().manual_seed(0)
    o = torch.rand(200, generator=g) * 0.98 + 0.01
    s = torch.rand(200, 3, generator=g) + 0.1
    n = torch.randint(1, 60, (200,), generator=g)  # past 51: clamped, as gsplat does
    new_o, new_s = compute_relocation(o, s, n)
    for i in range(200):
        ro, rs = eq9_loops(float(o[i]), float(s[i, 0]), int(n[i]))
        assert float(new_o[i]) == pytest.approx(ro, rel=1e-5, abs=1e-7)
        assert float(new_s[i, 0]) == pytest.approx(rs, rel=1e-4)
    # what Eq. 9 preserves: n copies at one place have the old opacity at the centre and the old
    # integral of the composited opacity along a line through it (1D: o s sqrt(2 pi))
    for o1, n1 in [(0.9, 3), (0.5, 7), (0.05, 2), (0.99, 20)]:
        (no,), ns = compute_relocation(torch.tensor([o1], dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64),
                                       torch.tensor([n1]))
        assert 1 - (1 - float(no)) ** n1 == pytest.approx(o1, rel=1e-9)
        x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
        comp = 1 - (1 - no * torch.exp(-0.5 * (x / ns[0, 0]) ** 2)) ** n1
        assert float(torch.trapezoid(comp, x)) == pytest.approx(o1 * math.sqrt(2 * math.pi), rel=1e-6)


@pytest.mark.cuda
def test_relocation_equals_gsplats_cuda_kernel():
    from gsplat.relocation import compute_relocation as gsplat_relocation

    g = torch.Generator().manual_seed(1)
    o = torch.rand(5000, generator=g) * 0.98 + 0.01
    s = torch.rand(5000, 3, generator=g) + 0.1
    n = torch.randint(1, 51, (5000,), generator=g)
    binoms = torch.tensor([[math.comb(a, b) if b <= a else 0 for b in range(51)] for a in range(51)],
                          dtype=torch.float32)
    ref_o, ref_s = gsplat_relocation(o.cuda(), s.cuda(), n.cuda(), binoms.cuda())
    ours_o, ours_s = compute_relocation(o.cuda(), s.cuda(), n.cuda())
    torch.testing.assert_close(ours_o.cpu(), ref_o.cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_s.cpu(), ref_s.cpu(), rtol=1e-3, atol=1e-5)  # the kernel sums in float32


def gaussians(opacities, seed=0):
    p = random_init(len(opacities), (0.0, 0.0, 0.0), 1.0, sh_degree=1, seed=seed)
    p["opacities"] = torch.logit(torch.tensor(opacities, dtype=torch.float32))
    params = {k: torch.nn.Parameter(v.float().contiguous()) for k, v in p.items()}
    opts = {k: torch.optim.Adam([v], lr=1e-2) for k, v in params.items()}
    loss = sum(((v + 1.0) ** 2).sum() for v in params.values())  # every moment nonzero
    loss.backward()
    for o in opts.values():
        o.step()
    return params, opts


def test_dead_gaussians_are_relocated_onto_live_ones():
    ops = [0.9, 0.001, 0.6, 0.003, 0.8, 0.3, 0.004]
    params, opts = gaussians(ops)
    before = {k: v.detach().clone() for k, v in params.items()}
    moments = {k: {m: o.state[params[k]][m].clone() for m in ("exp_avg", "exp_avg_sq")} for k, o in opts.items()}
    dead = torch.sigmoid(params["opacities"].detach()) <= 0.005
    state = {"grad2d": torch.ones(7)}
    moved = relocate(params, opts, state, dead, generator=torch.Generator().manual_seed(0))
    assert moved == 3 and params["means"].shape[0] == 7
    o = torch.sigmoid(params["opacities"].detach())
    assert bool((o > 0.005).all())  # nobody is dead any more
    live = [0, 2, 4, 5]
    for d in (1, 3, 6):  # each dead row is now a copy of a live one: same place, shape and colour
        src = [j for j in live if torch.equal(params["means"][d], before["means"][j])]
        assert len(src) == 1
        j = src[0]
        assert torch.equal(params["quats"][d], before["quats"][j]) and torch.equal(params["sh0"][d], before["sh0"][j])
        copies = 1 + sum(torch.equal(params["means"][x], before["means"][j]) for x in (1, 3, 6))
        o_j = torch.sigmoid(before["opacities"][j:j + 1])
        exp_o, exp_s = compute_relocation(o_j, torch.exp(before["scales"][j:j + 1]),
                                          torch.tensor([copies]))
        assert float(o[d]) == pytest.approx(float(exp_o), rel=1e-5) == pytest.approx(float(o[j]), rel=1e-6)
        torch.testing.assert_close(torch.exp(params["scales"][d].detach()), exp_s[0], rtol=1e-5, atol=0)
        assert 1 - (1 - float(o[d])) ** copies == pytest.approx(float(o_j), rel=1e-4)  # the composite kept
    # the sampled rows changed opacity (each has a copy now); they and the dead restart Adam at 0
    touched = {i for i in range(7) if not torch.equal(params["opacities"][i], before["opacities"][i])}
    assert touched >= {1, 3, 6} and len(touched) > 3
    for name, opt in opts.items():
        st = opt.state[params[name]]
        assert opt.param_groups[0]["params"][0] is params[name]
        for key in ("exp_avg", "exp_avg_sq"):
            for i in range(7):
                assert bool((st[key][i] == 0).all()) == (i in touched)
                if i not in touched:
                    assert torch.equal(st[key][i], moments[name][key][i])
    assert [float(x) for x in state["grad2d"]] == [0.0 if i in touched else 1.0 for i in range(7)]


def test_sample_add_and_remove_keep_rows_aligned():
    params, opts = gaussians([0.9, 0.5, 0.2, 0.01])
    ops0 = torch.sigmoid(params["opacities"].detach()).clone()
    state = {"grad2d": torch.ones(4)}
    assert sample_add(params, opts, state, 10, generator=torch.Generator().manual_seed(0)) == 10
    assert params["means"].shape[0] == 14 and state["grad2d"].shape == (14,) and bool((state["grad2d"][4:] == 0).all())
    for name, opt in opts.items():
        st = opt.state[params[name]]
        assert st["exp_avg"].shape[0] == 14 and bool((st["exp_avg"][4:] == 0).all())
    o = torch.sigmoid(params["opacities"].detach())
    for j in range(4):  # each original with its m copies keeps the composite opacity
        m = sum(torch.equal(params["means"][x], params["means"][j]) for x in range(4, 14))
        assert 1 - (1 - float(o[j])) ** (m + 1) == pytest.approx(float(ops0[j]), rel=1e-4)
    assert remove_lowest_opacity(params, opts, state, 5) == 5
    assert params["means"].shape[0] == 9 and state["grad2d"].shape == (9,)
    assert float(torch.sigmoid(params["opacities"].detach()).min()) >= float(o.sort().values[5]) - 1e-7


def test_noise_moves_the_transparent_along_their_shape():
    params, _ = gaussians([0.999, 0.5, 0.002])
    before = params["means"].detach().clone()
    inject_noise(params, 0.01, torch.Generator().manual_seed(0))
    moved = (params["means"].detach() - before).norm(dim=-1)
    assert float(moved[0]) < 1e-12 and float(moved[1]) < 1e-12 and float(moved[2]) > 0


@pytest.mark.parametrize("budget", [20, 150])  # the tiny scene starts from 60 points: below and above
def test_train_mcmc_on_the_cpu_lands_on_exactly_the_budget(tmp_path, budget):
    scene = tiny_scene()
    m = train(tiny_config(tmp_path, strategy="mcmc", budget=str(budget), iters=200, device="cpu", backend="cpu"),
              scene=scene, progress=False)
    assert m["num_gaussians"] == m["budget"] == budget and m["strategy"] == "mcmc"
    hist = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["strategy_state"]["history"]
    assert [n for _, n in hist] == budget_schedule(60, budget, len(hist))  # the schedule, refinement by refinement
    assert m["psnr"] > 15


def test_finalize_lands_on_the_budget_however_the_run_ended():
    for budget in (3, 9, 40):
        params, opts = gaussians([0.9, 0.5, 0.2, 0.01, 0.7, 0.3])
        s = BudgetMCMCStrategy(budget=budget, refine_start_iter=10, refine_stop_iter=100, refine_every=10)
        state = s.initialize_state()
        s.step_post_backward(params, opts, state, 5, {}, lr=1e-3)  # before the first refinement
        assert s.finalize(params, opts, state, 6) == budget == params["means"].shape[0]
        assert state["history"][-1] == (6, budget)


def test_train_mcmc_through_the_cli_on_the_cpu(capsys, tmp_path):
    from budget3d.cli import main
    from test_train import write_blender_scene

    data = write_blender_scene(tmp_path / "scene")
    run = tmp_path / "r"
    code = main([str(a) for a in ("train", "--data", data, "--budget", "45", "--out", run, "--iters", 60,
                                  "--strategy", "mcmc", "--device", "cpu", "--sh-degree", 1, "--quiet")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_gaussians"] == m["budget"] == 45 and m["strategy"] == "mcmc" and m["device"] == "cpu"


@pytest.mark.cuda
def test_train_mcmc_on_cuda_lands_on_exactly_the_budget(tmp_path):
    m = train(tiny_config(tmp_path, strategy="mcmc", budget="150", iters=200, device="cuda", backend="auto"),
              scene=tiny_scene(), progress=False)
    assert m["num_gaussians"] == 150 and m["device"].startswith("cuda")
