"""The graph of verified pairs and its clusters (connected components), with weak bridges cut.

Photos are nodes; a candidate pair is an edge when its inlier count n >= ``min_inliers``. Clusters
are the connected components (Radenović et al., TPAMI'18 cluster their verified image graph before
SfM). One wrong edge can join two landmarks into one cluster, and a cluster is the unit that the
tuples treat as "same place" (positives) and that negatives must differ from, so an edge that is
the *only* link between two groups is held to a higher standard:

- a **bridge** is an edge whose removal disconnects its component (every other edge lies on a
  cycle: two edge-disjoint paths hold its ends together);
- a bridge with both sides of at least ``min_side`` (2) photos and n < ``bridge_inliers`` is cut:
  two groups merge only through >= 2 edge-disjoint verified paths or one strong edge. A bridge to
  a single photo (a pendant edge) is never cut: it is that photo's only evidence, not a merger.

Side sizes come from the bridge tree: the 2-edge-connected components (what remains after removing
every bridge) contracted to nodes weighted by their photo counts, joined by the bridges; removing a
tree edge splits its tree into a subtree (the child's side) and the rest.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_graph", "components"]


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label (N,) int64 of each node of the graph with ``edges`` (E, 2); nodes
    in no edge get -1; components are numbered 0, 1, ... by their smallest node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.full(n, -1, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) == 0:
        return labels
    g = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, raw = connected_components(g, directed=False)
    used = np.zeros(n, dtype=bool)
    used[edges.ravel()] = True
    nxt = 0
    remap: dict[int, int] = {}
    for i in np.flatnonzero(used):  # increasing node order: numbered by smallest node
        c = int(raw[i])
        if c not in remap:
            remap[c] = nxt
            nxt += 1
        labels[i] = remap[c]
    return labels


def cluster_graph(n: int, pairs: np.ndarray, inliers: np.ndarray, min_inliers: int, bridge_inliers: int = 0,
                  min_side: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, cut (C,) int64): the cluster of each photo (-1: in no verified pair) and
    the indices into ``pairs`` of the verified edges cut as weak bridges (module docstring).

    pairs (P, 2) photo indices, inliers (P,) counts; ``bridge_inliers`` 0 cuts nothing.
    """
    import networkx as nx

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    inliers = np.asarray(inliers).reshape(-1)
    if len(inliers) != len(pairs):
        raise ValueError(f"{len(inliers)} inlier counts for {len(pairs)} pairs")
    verified = np.flatnonzero(inliers >= min_inliers)
    cut: list[int] = []
    if bridge_inliers > 0 and len(verified):
        g = nx.Graph()
        edge_of: dict[tuple[int, int], int] = {}
        for p in verified:
            a, b = int(pairs[p, 0]), int(pairs[p, 1])
            g.add_edge(a, b)
            edge_of[(min(a, b), max(a, b))] = int(p)
        bridges = [(min(a, b), max(a, b)) for a, b in nx.bridges(g)]
        if bridges:
            core = g.copy()
            core.remove_edges_from(bridges)
            comp_of: dict[int, int] = {}
            weight: list[int] = []
            for ci, nodes in enumerate(sorted(nx.connected_components(core), key=min)):
                for v in nodes:
                    comp_of[v] = ci
                weight.append(len(nodes))
            tree = nx.Graph()
            tree.add_nodes_from(range(len(weight)))
            for a, b in bridges:
                tree.add_edge(comp_of[a], comp_of[b], edge=(a, b))
            for part in nx.connected_components(tree):
                root = min(part)
                total = sum(weight[c] for c in part)
                sub = {c: weight[c] for c in part}
                parent = dict(nx.bfs_predecessors(tree, root))
                for c in reversed(list(nx.bfs_tree(tree, root))):  # children before parents
                    if c in parent:
                        sub[parent[c]] += sub[c]
                for c, p in parent.items():
                    a, b = tree.edges[c, p]["edge"]
                    e = edge_of[(a, b)]
                    if inliers[e] < bridge_inliers and min(sub[c], total - sub[c]) >= min_side:
                        cut.append(e)
    cut_arr = np.asarray(sorted(cut), dtype=np.int64)
    keep = np.setdiff1d(verified, cut_arr)
    return components(n, pairs[keep]), cut_arr
