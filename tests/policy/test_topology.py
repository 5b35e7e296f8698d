"""Normalised adjacency: GCN normalisation, symmetrisation, de-duplication, caching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.policy.snapshot import GraphTopology
from tamiyo.policy.topology import AdjacencyCache, LruCache, normalized_adjacency


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29)), max_size=80))
def test_matches_dense_formula(n: int, edges: list[tuple[int, int]]) -> None:
    ei = np.array([(s, d) for s, d in edges if s < n and d < n and s != d], np.int64)
    ei = ei.T.reshape(2, -1)
    adj = normalized_adjacency(n, ei)
    a = np.zeros((n, n))
    a[ei[1], ei[0]] = 1.0
    a[ei[0], ei[1]] = 1.0  # undirected, duplicates collapse to 1
    a += np.eye(n)
    d = a.sum(1)
    want = a / np.sqrt(d[:, None] * d[None, :])
    np.testing.assert_allclose(adj.dense(), want, rtol=1e-6, atol=1e-7)
    assert adj.nnz == int((a > 0).sum())
    assert (np.diff(adj.crow) >= 1).all()  # every row has its self loop
    np.testing.assert_array_equal(np.repeat(np.arange(n), np.diff(adj.crow)), adj.row)
    assert not adj.val.flags.writeable


def test_cache_is_per_topology_and_bounded() -> None:
    def topo(extra: int) -> GraphTopology:
        return GraphTopology.build(
            ["a", "b", "c"],
            [1] * 3,
            [1] * 3,
            [1] * 3,
            [0] * 3,
            [1] * 3,
            np.array([[0, 1], [1, 2]]) if extra == 0 else np.array([[0], [2]]),
        )

    cache = AdjacencyCache(capacity=1)
    t1, t1_again, t2 = topo(0), topo(0), topo(1)
    assert t1.key == t1_again.key != t2.key
    a = cache.get_for(t1)
    assert cache.get_for(t1_again) is a
    assert (cache.hits, cache.misses) == (1, 1)
    cache.get_for(t2)
    assert len(cache) == 1
    assert cache.get_for(t1) is not a  # evicted, recomputed


def test_lru_get_many_counts_and_refreshes() -> None:
    cache = LruCache[int](capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get_many(["a", "x", "a"]) == [1, None, 1]
    assert (cache.hits, cache.misses) == (2, 1)
    cache.put("c", 3)  # "a" was used last, so "b" is evicted
    assert cache.get_many(["b", "a", "c"]) == [None, 1, 3]
