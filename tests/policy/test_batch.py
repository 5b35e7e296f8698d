"""collate: padded layout, flat view, kernel padding and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamiyo.policy.batch import collate
from tamiyo.policy.features import featurize, snapshot_from_state
from tamiyo.policy.synthetic import random_graphs

from .conftest import make_state


@pytest.mark.parametrize("dense", [True, False])
def test_layout_and_flat_view(dense: bool) -> None:
    graphs = random_graphs(3, [4, 1, 6], k=2)
    graphs.append(featurize(snapshot_from_state(make_state(2, kernels=()), 4)))
    b = collate(graphs, dense=dense)
    assert (b.num_graphs, b.num_nodes, b.n_max, b.k_max) == (4, 13, 6, 2)
    assert b.ptr_list == [0, 4, 5, 11, 13]
    assert b.node_batch.tolist() == [0] * 4 + [1] + [2] * 6 + [3] * 2
    x_flat = np.concatenate([g.x for g in graphs])
    np.testing.assert_array_equal(b.x[b.node_index].numpy(), x_flat)
    assert b.node_mask.sum().item() == 13
    pad = torch.ones(b.x.shape[0], dtype=torch.bool)
    pad[b.node_index] = False
    assert bool((b.x[pad] == 0).all())
    assert b.dense_adj == dense
    assert b.kernel_x.shape == (4, 2, 2)
    assert b.pair_invalid[3].all()  # no kernels offered → nothing valid
    valid = ~b.pair_invalid.reshape(-1, 2)[b.node_index]
    np.testing.assert_array_equal(
        valid.any(1).numpy(), np.concatenate([g.target_mask for g in graphs])
    )
    torch.testing.assert_close(b.pool_weight.sum(2).squeeze(1), torch.ones(4))
    assert b.pad_neg is not None


def test_homogeneous_batch_needs_no_padding() -> None:
    b = collate(random_graphs(4, [5, 5, 5]))
    assert b.pad_neg is None
    assert b.node_index.tolist() == list(range(15))


def test_empty_batch_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([])
