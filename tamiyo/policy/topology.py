"""GCN-normalised adjacency, computed once per topology and cached.

The policy treats the host's data-flow graph as undirected (health problems propagate
forward through activations and backward through gradients), adds self loops and uses
the symmetric normalisation of Kipf & Welling, exactly as torch_geometric's ``GCNConv``
(``gcn_norm``) does on the symmetrised, de-duplicated edge list:

    Â = D^-1/2 (A + I) D^-1/2,   D_ii = 1 + in-degree of i in the symmetrised graph.

Computing it costs a few numpy calls per topology; a session's topology rarely changes,
so the server pays it once per session (and once per distinct topology in a batch).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from tamiyo.policy.snapshot import GraphTopology, IntArray

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class NormAdjacency:
    """Â of one graph in CSR form (rows = receiving node).

    ``crow`` int64 [N+1], ``row`` / ``col`` int64 [nnz] (COO view of the same entries,
    row-major sorted), ``val`` float32 [nnz]; ``edge_index`` int64
    [2, nnz - N] is the symmetrised, de-duplicated edge list *without* self loops, in the
    (source, target) convention of torch_geometric (for checking against ``GCNConv``).
    """

    num_nodes: int
    crow: IntArray
    row: IntArray
    col: IntArray
    val: npt.NDArray[np.float32]
    edge_index: IntArray

    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    @property
    def crow_tail(self) -> IntArray:
        """``crow[1:]`` (what ``collate`` concatenates into the batch's block-diagonal CSR)."""
        return self.crow[1:]

    def dense(self) -> npt.NDArray[np.float32]:
        """Â as a dense float32 [N, N] matrix (tests and small-graph kernels)."""
        out = np.zeros((self.num_nodes, self.num_nodes), np.float32)
        out[self.row, self.col] = self.val
        return out


def normalized_adjacency(num_nodes: int, edge_index: IntArray) -> NormAdjacency:
    """Â for ``num_nodes`` nodes and directed edges int64 [2, E] (uncached)."""
    n = int(num_nodes)
    ei = np.asarray(edge_index, np.int64).reshape(2, -1)
    ei = ei[:, ei[0] != ei[1]]
    both = np.concatenate([ei, ei[::-1]], axis=1)
    # De-duplicate via a linear key; (target, source) order gives CSR rows = targets.
    key = np.unique(both[1] * n + both[0])
    src, dst = key % n, key // n
    loops = np.arange(n, dtype=np.int64)
    rows = np.concatenate([dst, loops])
    cols = np.concatenate([src, loops])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    dinv = 1.0 / np.sqrt(deg)
    val = (dinv[rows] * dinv[cols]).astype(np.float32)
    crow = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=crow[1:])
    ei = np.stack([src, dst])
    for a in (crow, rows, cols, val, ei):
        a.setflags(write=False)
    return NormAdjacency(n, crow, rows, cols, val, ei)


class LruCache(Generic[T]):
    """Small thread-safe LRU map from a topology key (str) to a derived value.

    Sessions (event-loop thread) and the inference thread may both ask; the lock keeps
    the OrderedDict consistent. ``capacity`` bounds memory.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> T | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def get_many(self, keys: list[str]) -> list[T | None]:
        """``get`` of every key under one lock acquisition (a batch's topologies)."""
        out: list[T | None] = []
        with self._lock:
            items = self._items
            for key in keys:
                value = items.get(key)
                if value is None:
                    self.misses += 1
                else:
                    items.move_to_end(key)
                    self.hits += 1
                out.append(value)
        return out

    def put(self, key: str, value: T) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class AdjacencyCache(LruCache[NormAdjacency]):
    """``NormAdjacency`` per ``GraphTopology.key`` (one entry ≈ 20 B per nnz)."""

    def __init__(self, capacity: int = 4096) -> None:
        super().__init__(capacity)

    def get_for(self, topology: GraphTopology) -> NormAdjacency:
        adj = self.get(topology.key)
        if adj is None:
            adj = normalized_adjacency(topology.num_nodes, topology.edge_index)
            self.put(topology.key, adj)
        return adj


ADJACENCY_CACHE = AdjacencyCache()
"""Process-wide cache used by ``featurize``."""
