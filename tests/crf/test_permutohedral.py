from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab_lit.crf import PermutohedralLattice
from deeplab_lit.crf.mean_field import pixel_features
from deeplab_lit.crf.synthetic import synthetic_scene


def _brute_force(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense Gaussian filter, normalised per point: sum_j k_ij v_j / sum_j k_ij."""
    kernel = torch.exp(-(torch.cdist(features.double(), features.double()) ** 2) / 2)
    return (kernel @ values.double()) / kernel.sum(1, keepdim=True)


def _normalised(lattice: PermutohedralLattice, values: torch.Tensor) -> torch.Tensor:
    ones = values.new_ones(*values.shape[:2], 1)
    return lattice.filter(values) / lattice.filter(ones)


@pytest.mark.parametrize(("xy_std", "rgb_std"), [(1.0, None), (3.0, None), (5.0, 10.0), (10.0, 20.0)])
def test_lattice_filter_matches_brute_force_gaussian(xy_std, rgb_std):
    _, images, _ = synthetic_scene(1, 3, 16, 20, seed=3)
    features = pixel_features(images, xy_std, rgb_std)
    values = torch.rand(1, features.shape[1], 4, generator=torch.Generator().manual_seed(0))
    lattice = PermutohedralLattice(features)
    approx = _normalised(lattice, values)[0].double()
    exact = _brute_force(features[0], values[0])
    relative = ((approx - exact).norm() / exact.norm()).item()
    # The lattice is an approximation of the Gaussian (Adams et al. 2010): ~0.5-2% here.
    assert relative < 0.03, relative
    # ... and far better than doing nothing or a constant blur.
    assert relative < 0.2 * ((values[0].double() - exact).norm() / exact.norm()).item()


def test_lattice_reproduces_pydensecrf_filter_exactly():
    """The reference's own lattice, read back through one mean-field step, equals ours to float precision."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    gen = torch.Generator().manual_seed(0)
    for d in (2, 5):
        points = 500
        features = torch.rand(points, d, generator=gen) * 6
        q = torch.rand(points, 4, generator=gen) + 0.1
        q = q / q.sum(1, keepdim=True)
        # One iteration with unary U = -log q and a diagonal compatibility (0 for the last label) gives
        # log Q1_l - log Q1_last = -U_l + U_last - w_l * (normalised filter of q)_l.
        unary = -q.log().T.contiguous().numpy()
        crf = dcrf.DenseCRF(points, 4)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseEnergy(features.T.contiguous().numpy(), compat=np.array([1, 1, 1, 0], np.float32))
        log_q1 = np.log(np.asarray(crf.inference(1)))
        reference = -(log_q1[:3] - log_q1[3:] + unary[:3] - unary[3:]).T
        lattice = PermutohedralLattice(features[None])
        norm = (lattice.filter(torch.ones(1, points, 1)) + 1e-20).rsqrt()
        ours = (norm * lattice.filter(norm * q[None]))[0, :, :3].numpy()
        assert np.abs(ours - reference).max() < 1e-5


def test_batched_lattice_equals_one_lattice_per_image():
    _, images, _ = synthetic_scene(2, 3, 12, 15, seed=4)
    features = pixel_features(images, 4.0, 8.0)
    values = torch.rand(2, 12 * 15, 3, generator=torch.Generator().manual_seed(1))
    batched = PermutohedralLattice(features).filter(values)
    for i in range(2):
        single = PermutohedralLattice(features[i : i + 1]).filter(values[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)


def test_scaled_folds_per_point_factors():
    _, images, _ = synthetic_scene(1, 3, 10, 12, seed=5)
    lattice = PermutohedralLattice(pixel_features(images, 2.0, 5.0))
    values = torch.rand(1, 120, 3)
    before, after = torch.rand(1, 120) + 0.5, torch.rand(1, 120) + 0.5
    expected = after[..., None] * lattice.filter(before[..., None] * values)
    torch.testing.assert_close(lattice.scaled(before, after).filter(values), expected)


def test_lattice_rejects_bad_input():
    with pytest.raises(ValueError, match=r"float features of shape \(B, P, d\)"):
        PermutohedralLattice(torch.zeros(10, 2))
    lattice = PermutohedralLattice(torch.rand(1, 10, 2))
    with pytest.raises(ValueError, match=r"values must have shape \(B, P, C\) = \(1, 10, C\)"):
        lattice.filter(torch.rand(1, 11, 3))
