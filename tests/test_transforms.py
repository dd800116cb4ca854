import itertools

import numpy as np
import pytest
import scipy.fft
import torch

from lsc.blocking import BlockLayout, choose_block_shape, from_blocks, to_blocks
from lsc.morton import morton_order
from lsc.transforms import block_inverse_transform, block_transform, dct_matrix


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 2), (2, 3, 2, 3), (2, 2, 3, 2, 2), (2, 2, 2, 2, 3, 2)])
def test_block_dct_matches_scipy_dctn(shape):
    x = torch.randn(3, *shape, dtype=torch.float64)  # a leading block-grid dim
    got = block_transform(x, shape).numpy()
    want = scipy.fft.dctn(x.numpy(), norm="ortho", axes=tuple(range(1, len(shape) + 1)))
    np.testing.assert_allclose(got, want, atol=1e-12)
    back = block_inverse_transform(torch.from_numpy(got), shape)
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-12)


def test_dct_matrix_is_orthonormal():
    for n in (1, 2, 3, 8, 17, 256):
        d = dct_matrix(n, torch.float64)
        torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("shape,block", [((), ()), ((5,), (2,)), ((7, 9), (4, 4)), ((3, 1, 5), (2, 1, 2)),
                                          (tuple([2] * 9 + [3]), tuple([2] * 10)), ((10, 3), (8, 8))])
def test_blocks_round_trip_any_rank(shape, block):
    x = torch.randn(shape)
    layout = BlockLayout(tuple(shape), choose_block_shape(tuple(shape), block))
    blocks = to_blocks(x, layout)
    assert tuple(blocks.shape) == layout.coeff_shape
    assert torch.equal(from_blocks(blocks, layout), x)


def test_morton_order_is_a_z_curve_in_any_rank():
    assert morton_order((4, 4)).tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    for shape in [(3,), (3, 5), (2, 3, 4), tuple([2] * 10), (256, 256, 2)]:
        order = morton_order(shape)
        assert sorted(order.tolist()) == list(range(int(np.prod(shape))))
    # far beyond the seed's 64-bit / 8-D packing limit: 12 dims of 256 would need 96 bits
    coords = np.array(list(itertools.product(range(2), repeat=12)))
    order = morton_order(tuple([2] * 12))
    assert order[0] == 0 and order[-1] == 2**12 - 1 and len(coords) == len(order)
