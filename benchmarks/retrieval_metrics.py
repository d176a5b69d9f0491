"""Retrieval metrics and the bootstrap.

Query ``i``'s right document is document ``i``. With ``S = Q D^T`` (cosine scores ``[n, n]``),
the rank of the right document is ``1 + #{j : S[i, j] > S[i, i]}`` (ties count in its favour), and

    recall@k = mean_i [rank_i <= k]          MRR = mean_i 1 / rank_i

The bootstrap resamples queries with replacement (the same resample indices for every row of a
study when given the same seed, so rows are compared on the same resampled query sets) and takes
the 2.5th and 97.5th percentiles of the resampled means.
"""

from __future__ import annotations

import torch

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


def ranks(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """``queries, documents: [n, H]`` (row i matches row i) -> rank of the right document ``[n]`` (int64, >= 1)."""
    if queries.dim() != 2 or queries.shape != documents.shape:
        raise ValueError(f"queries and documents must both be [n, H] of the same shape, got "
                         f"{tuple(queries.shape)} and {tuple(documents.shape)}")
    s = queries.double() @ documents.double().T
    right = s.diagonal().unsqueeze(1)
    return 1 + (s > right).sum(1)


def recall_at(rank: torch.Tensor, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    return float((rank <= k).double().mean())


def mrr(rank: torch.Tensor) -> float:
    return float((1.0 / rank.double()).mean())


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` with the same row of ``b``: ``[n]``."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def percentile(x: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    return float(torch.quantile(x.double(), q / 100))


def bootstrap_ci(values: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of ``values.mean()`` (values: ``[n]`` per-query scores, e.g. hit@1)."""
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    g = torch.Generator().manual_seed(seed)
    n = values.numel()
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = values.double()[idx].mean(1)
    lo = (1 - level) / 2
    return percentile(means, 100 * lo), percentile(means, 100 * (1 - lo))


# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..10, as standard tables print them
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 10 (the CIs the reports quote), scipy's quantile beyond."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    return T975[df - 1] if df <= len(T975) else float(t.ppf(0.975, df))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """95% Student-t CI of the mean of a few runs (e.g. seeds); a single value gives (v, v)."""
    import math

    n = len(values)
    if n == 0:
        raise ValueError("values must not be empty")
    m = sum(values) / n
    if n == 1:
        return m, m
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> dict:
    """recall@1, its bootstrap CI, recall@10 and MRR of one embedding pair."""
    r = ranks(queries, documents)
    lo, hi = bootstrap_ci((r == 1).double(), resamples, seed)
    return {"recall_at_1": recall_at(r, 1), "recall_at_1_ci": [lo, hi], "recall_at_10": recall_at(r, 10),
            "mrr": mrr(r), "n_queries": int(r.numel())}
