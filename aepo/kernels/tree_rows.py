"""Losses on unique tree rows: the flat [B, L] positions of a packed tree mapped to (row, label)
edges, so that the vocabulary head runs once per edge instead of once per occurrence.

A packed tree holds each shared token once: flat position (b, t) reads packed row
``rows[b, t]`` (-1 at padding) and predicts ``labels[b, t]``. Positions of several branches
share a (row, label) pair (a shared prefix token); a row predicts several labels at a fork.
An edge is one distinct (row, label) pair among the kept positions; every per-token quantity
of the head (logp, entropy, dL/dlogits, the GEMMs) is a function of the edge alone, while the
objective (clipping, advantages, normaliser, metrics) still runs per occurrence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from aepo.kernels._checks import check_labels


class Edges(NamedTuple):
    """The distinct (row, label) pairs of the kept positions, sorted by row, then label."""

    rows: torch.Tensor  # [E] long: packed row of each edge
    labels: torch.Tensor  # [E] long: the label it predicts
    inverse: torch.Tensor  # [K] long: edge of each kept position, in row-major order


@torch.compiler.disable  # data-dependent sizes: one graph break under torch.compile
def unique_edges(rows: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> Edges:
    """Deduplicate the kept positions of a packed tree to (row, label) edges.

    Args:
        rows: [...] long packed row of each flat position (-1 at padding).
        labels: [...] long label of each flat position (same shape).
        keep: [...] bool, the positions that count (mask != 0); rows >= 0 and labels >= 0
            there. Other positions are ignored whatever they hold.
    Returns:
        :class:`Edges` (edge_rows [E], edge_labels [E], inverse [K]), K = keep.sum(), such
        that ``values_flat[keep] == values_edge[inverse]`` for any per-edge values (e.g. old
        log-probs computed once per edge). Costs one sort of K keys and two host syncs.
    """
    r, y = rows[keep], labels[keep]
    if r.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=rows.device)
        return Edges(empty, empty, empty)
    span = int(y.max()) + 1  # key row * span + label: < R * V, far inside int64
    key, inverse = torch.unique(r * span + y, sorted=True, return_inverse=True)
    return Edges(key // span, key % span, inverse)


class RowEdges(NamedTuple):
    """:class:`Edges` grouped by their row: each distinct trained row once, with its first
    edge's label as its primary label; the row's further edges (fork points, where branches
    predict different next tokens) are its extra labels."""

    rows: torch.Tensor  # [U] long: packed row of each unique trained row
    primary: torch.Tensor  # [U] long: the label of its first edge
    local: torch.Tensor  # [E] long: the unique row (index into U) of each edge
    extra: torch.Tensor  # [E] bool: the edge is not its row's first
    starts: list[int]  # host [U + 1]: row u's edges are starts[u]:starts[u + 1]


def first_of_row(edges: Edges) -> torch.Tensor:
    """[E] bool: the edge is the first (smallest label) of its row (edges are sorted by row)."""
    first = torch.ones_like(edges.rows, dtype=torch.bool)
    first[1:] = edges.rows[1:] != edges.rows[:-1]
    return first


def row_edges(edges: Edges) -> RowEdges:
    """:class:`RowEdges` of ``edges`` (sorted by row). One host sync (``starts``)."""
    first = first_of_row(edges)
    head = first.nonzero().squeeze(1)  # [U]
    starts = [*head.tolist(), edges.rows.numel()]
    local = torch.cumsum(first, 0) - 1
    return RowEdges(edges.rows[head], edges.labels[head], local, ~first, starts)


class Occurrences(NamedTuple):
    """The kept positions sorted by edge, so that a block of edges is a range of them."""

    flat: torch.Tensor  # [K] long: flat index (into the [B * L] grid) of each occurrence
    edge: torch.Tensor  # [K] long: its edge (non-decreasing)
    offsets: torch.Tensor  # [E + 1] long on the host: edge e's occurrences are [o[e], o[e+1])


def occurrences(keep_index: torch.Tensor, edges: Edges) -> Occurrences:
    """:class:`Occurrences` of ``edges`` from the [K] flat indices of the kept positions
    (row-major, the order of ``edges.inverse``). One host sync (the [E + 1] offsets)."""
    order = torch.argsort(edges.inverse, stable=True)
    counts = torch.bincount(edges.inverse, minlength=edges.rows.numel())
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).cpu()
    return Occurrences(keep_index[order], edges.inverse[order], offsets)


def unique_table(table: torch.Tensor, name: str) -> torch.Tensor:
    """The [R, X] unique rows of ``table`` given as [R, X] or [1, R, X] (a view)."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
    if table.dim() == 3 and table.shape[0] == 1:
        return table[0]
    if table.dim() != 2:
        raise ValueError(
            f"with rows=, {name} must be the packed unique rows [R, X] or [1, R, X], got "
            f"{tuple(table.shape)}"
        )
    return table


def check_rows(
    rows: torch.Tensor,
    labels: torch.Tensor,
    table: torch.Tensor,
    name: str,
    vocab: int,
    ignore_index: int,
) -> torch.Tensor:
    """Validate ``rows`` [...] against the [R, X] unique ``table`` and ``labels`` [...]
    (``ignore_index`` where not kept); return the labels as int64. Range checks cost one host
    sync, skipped under torch.compile."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.long:
        raise TypeError(f"rows must be int64 (torch.long), got dtype {rows.dtype}")
    if not isinstance(labels, torch.Tensor) or rows.shape != labels.shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"rows shape {tuple(rows.shape)} must equal labels shape {got}")
    if rows.device != table.device:
        raise ValueError(
            f"{name} and rows must be on the same device, got {table.device} and {rows.device}"
        )
    labels = check_labels(labels, rows.unsqueeze(-1), "rows", "trailing", vocab, ignore_index)
    if rows.numel() == 0 or torch.compiler.is_compiling():
        return labels
    n = table.shape[0]
    bad = (rows < -1) | (rows >= n)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"rows must be in [-1, {n}) ({name} holds {n} unique rows); found "
            f"{int(rows[where])} at index {where} ({int(bad.sum())} bad in all)"
        )
    orphan = (labels != ignore_index) & (rows < 0)
    if bool(orphan.any()):
        where = tuple(orphan.nonzero()[0].tolist())
        raise ValueError(
            f"kept tokens (mask != 0) need a row >= 0; rows is -1 at index {where} "
            f"({int(orphan.sum())} in all)"
        )
    return labels


def to_flat(values: torch.Tensor, edges: Edges, keep: torch.Tensor) -> torch.Tensor:
    """[E] per-edge values -> [*keep.shape] on the flat grid (zeros where not kept);
    differentiable (its backward sums the occurrences onto their edges)."""
    flat = values.new_zeros(keep.shape)
    return flat.index_put((keep,), values[edges.inverse])
