"""Neighbour distances for the point-cloud initialisation (k-d tree) against brute force."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from budget3d.splat.knn import knn_mean_dist
from budget3d.splat.gaussians import init_from_points


def _brute(p, k):
    p = np.asarray(p, np.float64)
    k = min(k, len(p) - 1)
    d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    return np.sort(d, 1)[:, 1:k + 1].mean(1)


def _clouds():
    rng = np.random.default_rng(0)
    return {
        "gaussian": rng.normal(size=(1500, 3)),
        "two scales": np.concatenate([rng.normal(size=(400, 3)) * 1e-3, rng.normal(size=(400, 3)) * 100 + 1e4]),
        "duplicates": np.repeat(rng.normal(size=(200, 3)), 3, 0),  # every point has two at distance 0
        "deep tree": np.concatenate([2.0 ** -np.arange(60)[:, None] * np.ones((1, 3)), rng.normal(size=(50, 3))]),
        "plane": np.c_[rng.uniform(size=(600, 2)), np.zeros(600)],
        "two points": rng.normal(size=(2, 3)),
        "three points": rng.normal(size=(3, 3)),
    }


@pytest.mark.parametrize("name", list(_clouds()))
@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_brute_force(name, k):
    p = _clouds()[name]
    got = knn_mean_dist(p, k)
    ref = _brute(p, k)
    assert got.dtype == np.float32 and got.shape == (len(p),)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)


def test_init_from_points_scales_are_log_neighbour_distances():
    p = np.random.default_rng(1).normal(size=(500, 3)).astype(np.float32)
    g = init_from_points(p, None)
    np.testing.assert_allclose(torch.exp(g["scales"][:, 0]).numpy(), _brute(p, 3), rtol=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "garden_points" / "test_garden.npz").exists(), reason="needs ../shared/data")
def test_knn_on_the_garden_cloud():
    """138k real points: exact on sampled queries (brute force on those rows only)."""
    p = np.load(SHARED_DATA / "garden_points" / "test_garden.npz")["means3d"].astype(np.float64)
    got = knn_mean_dist(p, 3)
    for i in np.random.default_rng(0).choice(len(p), 200, replace=False):
        d = np.sort(np.sqrt(((p - p[i]) ** 2).sum(1)))
        assert abs(got[i] - d[1:4].mean()) <= 1e-6 * d[1:4].mean()
