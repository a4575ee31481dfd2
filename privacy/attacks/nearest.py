"""Nearest-neighbour search in L2 over image sets of any size, in chunks of bounded memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

from privacy.errors import AuditError

Transform = Callable[[torch.Tensor], torch.Tensor]


def nearest_l2(queries: torch.Tensor, refs: torch.Tensor, *, transform: Transform | None = None,
               exclude: torch.Tensor | None = None, query_chunk: int = 256,
               ref_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2 distance to, and index of, the nearest of *all* ``refs`` for every query.

    Parameters
    ----------
    queries, refs
        (n, ...) and (N, ...) images; compared flattened, as float32.
    transform
        Applied to every chunk of ``refs`` (and to ``queries``) before comparing, e.g. mapping
        normalised images to pixels, so a converted copy of all of ``refs`` never exists.
    exclude
        (n,) index into ``refs`` that query i must skip (its own copy), or -1 for none.
    query_chunk, ref_chunk
        Memory holds a (query_chunk, ref_chunk) distance block at a time.

    Returns
    -------
    distance, index
        (n,) float32 and (n,) int64. The search uses ``torch.cdist``'s matrix-product form;
        the returned distance is recomputed exactly for the pair found, so a copy reads 0.
    """
    if len(refs) == 0:
        raise AuditError("nearest-neighbour search needs at least one reference image")
    prep = transform if transform is not None else (lambda t: t)
    q = prep(queries.detach().float()).flatten(1)  # (n, D)
    best_d = torch.full((len(q),), float("inf"))
    best_i = torch.zeros(len(q), dtype=torch.long)
    for j in range(0, len(refs), ref_chunk):
        r = prep(refs[j:j + ref_chunk].detach().float()).flatten(1)  # (b, D)
        for i in range(0, len(q), query_chunk):
            d = torch.cdist(q[i:i + query_chunk], r)  # (a, b)
            if exclude is not None:
                rows = torch.arange(d.shape[0])
                cols = exclude[i:i + query_chunk] - j
                hit = (cols >= 0) & (cols < d.shape[1])
                d[rows[hit], cols[hit]] = float("inf")
            value, index = d.min(1)
            better = value < best_d[i:i + query_chunk]
            best_d[i:i + query_chunk][better] = value[better]
            best_i[i:i + query_chunk][better] = index[better] + j
    exact = (q - prep(refs[best_i].detach().float()).flatten(1)).norm(dim=1)
    return torch.where(torch.isinf(best_d), best_d, exact), best_i  # inf: every reference excluded
