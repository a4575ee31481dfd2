"""Nearest-neighbour search (L2, SSIM) over image sets of any size, in chunks of bounded memory."""

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


SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # SSIM's stabilisers for pixels in [0, 1]


def _windows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every k x k window of every channel, centred: (C*L, n, k*k), with its mean and variance (C*L, n)."""
    n = len(x)
    p = x.unfold(2, k, 1).unfold(3, k, 1).reshape(n, -1, k * k).transpose(0, 1)  # (C*L, n, k*k)
    mu = p.mean(-1)
    centred = (p - mu[..., None]).contiguous()
    return centred, mu, centred.pow(2).mean(-1)


def nearest_ssim(queries: torch.Tensor, refs: torch.Tensor, *, window: int = 7, query_block: int = 64,
                 block_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest SSIM to, and index of, the most similar of *all* ``refs`` for every query.

    The SSIM of :func:`privacy.attacks.metrics.ssim` (uniform ``window``, valid region, mean
    over channels and positions; pixels in [0, 1]) for every (query, ref) pair, as batched
    tensor operations: each image's windows are centred once, and the covariances of a block
    of pairs are one batched matrix product over window positions. A block holds
    ``query_block`` queries and at most ``block_elements`` (pair, window) values; the centred
    windows of every reference (``window**2`` times the images' size) stay in memory.

    Returns
    -------
    similarity, index
        (n,) float32 and (n,) int64.
    """
    if len(refs) == 0:
        raise AuditError("nearest-neighbour search needs at least one reference image")
    q, r = queries.detach().float(), refs.detach().float()  # (n, C, H, W), (N, C, H, W)
    k = min(window, q.shape[-1], q.shape[-2])
    windows = q.shape[1] * (q.shape[-2] - k + 1) * (q.shape[-1] - k + 1)  # C * L
    ref_block = max(1, min(len(r), block_elements // (windows * query_block)))
    blocks = []  # per block of refs: centred windows scaled so the product is 2 cov, (CL, k*k, b); mean, var
    for j in range(0, len(r), ref_block):
        wr, mu_r, var_r = _windows(r[j:j + ref_block], k)
        scaled = (wr.transpose(1, 2) * (2 / (k * k))).contiguous()
        blocks.append((scaled, mu_r[:, None], var_r[:, None] + SSIM_C2))
    best_s = torch.full((len(q),), float("-inf"))
    best_i = torch.zeros(len(q), dtype=torch.long)
    for i in range(0, len(q), query_block):
        wq, mu_q, var_q = _windows(q[i:i + query_block], k)  # (CL, a, k*k), (CL, a)
        mu_q, var_q = mu_q[..., None], var_q[..., None]  # (CL, a, 1)
        for j, (wr, mu_r, var_r) in zip(range(0, len(r), ref_block), blocks, strict=True):
            s = torch.bmm(wq, wr).add_(SSIM_C2)  # 2 cov + c2, (CL, a, b)
            s.mul_(2 * mu_q * mu_r + SSIM_C1)
            s.div_(mu_q**2 + mu_r**2 + SSIM_C1).div_(var_q + var_r)
            value, index = s.mean(0).max(1)  # SSIM averaged over channels and positions, best ref
            better = value > best_s[i:i + query_block]
            best_s[i:i + query_block][better] = value[better]
            best_i[i:i + query_block][better] = index[better] + j
    return best_s, best_i
