"""Tree packing: the rows of a right-padded batch folded into a compressed trie, so that a token
shared by several rows (a group's prompt, a response prefix up to a fork) is stored once.

Two rows share a flat position iff their real tokens up to and including it are identical. The
trie's single-child chains are the segments; packed order is depth-first (parents before
children, a segment's tokens contiguous) and a token's position is its depth in its own path.
:func:`unpack` maps packed values back to the flat ``[B, L]`` layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class TreePack:
    """One packed tree batch (all tensors on one device)."""

    input_ids: torch.Tensor  # [1, T] long: unique tokens, segment by segment
    position_ids: torch.Tensor  # [1, T] long: each token's position in its own path
    index: torch.Tensor  # [B, L] long: packed position of flat (b, t); -1 at padding
    seg_bounds: torch.Tensor  # [S + 1] int32: segment s is packed tokens seg_bounds[s]:[s + 1]
    kv_index: torch.Tensor  # [K] long: per segment, its path's packed tokens up to its end
    kv_bounds: torch.Tensor  # [S + 1] int32: segment s's keys are kv_index[kv_bounds[s]:[s + 1]]
    max_q: int  # longest segment
    max_k: int  # longest key list (= longest row)
    flat_tokens: int  # real tokens of the flat batch

    @property
    def num_tokens(self) -> int:
        """T, the packed token count."""
        return self.input_ids.shape[1]

    @property
    def num_segments(self) -> int:
        return self.seg_bounds.shape[0] - 1

    @property
    def ratio(self) -> float:
        """Packed over flat real tokens (1.0: nothing shared)."""
        return self.num_tokens / max(self.flat_tokens, 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TreePack:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def pack_tree(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TreePack:
    """Fold a right-padded batch into a :class:`TreePack`.

    input_ids:      [B, L] integer token ids.
    attention_mask: [B, L] 1 (or True) at real tokens, 0 at right padding.

    Rows are sorted lexicographically (a depth-first order of the trie); each row then adds only
    the tokens past its longest common prefix with the previous row. Host-side work is O(B * L)
    in numpy plus one sort; the returned tensors live on ``input_ids.device``.
    """
    ids, lengths = _validated(input_ids, attention_mask)
    order = sorted(
        (b for b in range(len(lengths)) if lengths[b]), key=lambda b: ids[b, : lengths[b]].tolist()
    )
    index = np.full(ids.shape, -1, dtype=np.int64)  # [B, L]
    owners, depths = [], []  # per run of new tokens
    cuts: list[int] = []  # packed positions where a segment starts
    total, prev = 0, None
    for b in order:
        n = lengths[b]
        p = 0 if prev is None else _common_prefix(ids[prev, : lengths[prev]], ids[b, :n])
        if p:
            index[b, :p] = index[prev, :p]
        if n == p:  # a duplicate row: nothing new
            prev = b
            continue
        index[b, p:n] = np.arange(total, total + n - p)
        # Rows sharing a prefix are contiguous in sorted order, the shortest first: a row that
        # continues past a shorter previous row extends its segment; otherwise it forks at
        # depth p, which cuts the previous row's path before its token at depth p (the fork
        # node's first child) and starts a new segment here.
        if p == 0 or lengths[prev] > p:
            cuts.append(total)
            if p:
                cuts.append(int(index[prev, p]))
        owners.append(np.full(n - p, b, dtype=np.int64))
        depths.append(np.arange(p, n, dtype=np.int64))
        total += n - p
        prev = b
    return _assemble(ids, index, owners, depths, cuts, total, input_ids.device)


def _assemble(ids, index, owners, depths, cuts, total, device) -> TreePack:
    """Segments and key lists from the per-token owner row and depth."""
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)  # [T]
    depth = np.concatenate(depths) if depths else np.zeros(0, dtype=np.int64)  # [T]
    seg_bounds = np.append(np.unique(np.asarray(cuts, dtype=np.int64)), total)
    last = seg_bounds[1:] - 1  # [S] a segment's last token; its owner's path holds the segment
    kv = [index[owner[t], : depth[t] + 1] for t in last.tolist()]
    kv_len = np.asarray([len(k) for k in kv], dtype=np.int64)
    kv_index = np.concatenate(kv) if kv else np.zeros(0, dtype=np.int64)

    def tensor(a, dtype=torch.long):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return TreePack(
        input_ids=tensor(ids[owner, depth])[None],
        position_ids=tensor(depth)[None],
        index=tensor(index),
        seg_bounds=tensor(seg_bounds, torch.int32),
        kv_index=tensor(kv_index),
        kv_bounds=tensor(np.concatenate([[0], np.cumsum(kv_len)]), torch.int32),
        max_q=int(np.diff(seg_bounds).max(initial=0)),
        max_k=int(kv_len.max(initial=0)),
        flat_tokens=int((index >= 0).sum()),
    )


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def _validated(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[np.ndarray, list[int]]:
    """The ids as a host array [B, L] and each row's real length, or a ValueError."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
            f"shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    mask = attention_mask.detach().cpu()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = mask.to(torch.int8)
    rising = mask[:, 1:] > mask[:, :-1]  # a 1 right after a 0
    if rising.any():
        b, t = (int(i) for i in rising.nonzero()[0])
        raise ValueError(
            f"attention_mask row {b} is not right-padded: position {t} is 0 and {t + 1} is 1"
        )
    return input_ids.detach().cpu().numpy(), mask.sum(1).tolist()


def unpack(values: torch.Tensor, pack: TreePack) -> torch.Tensor:
    """Packed values back to the flat layout, zeros at padding (differentiable: a shared
    token's gradient is the sum over its flat occurrences).

    values: [1, T, ...] or [T, ...] (a leading 1 followed by T is taken as the batch dim).
    Returns [B, L, ...].
    """
    t = pack.num_tokens
    flat = values[0] if values.dim() >= 2 and values.shape[:2] == (1, t) else values
    if flat.shape[0] != t:
        raise ValueError(
            f"values must be [1, T, ...] or [T, ...] with T={t}, got {tuple(values.shape)}"
        )
    padded = torch.cat([flat, flat.new_zeros((1, *flat.shape[1:]))])  # [T + 1, ...]
    gather = torch.where(pack.index >= 0, pack.index, t).flatten()  # [B * L]
    return padded.index_select(0, gather).view(*pack.index.shape, *flat.shape[1:])
