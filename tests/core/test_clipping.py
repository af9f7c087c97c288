"""The activation clip search: its error against a per-token reference written out by hand, its
candidates, and the choice it makes."""

from __future__ import annotations

import torch

from quadllm.core.clipping import CLIP_STEP, MIN_CLIP, act_clip_error, coarse_clips, search_act_clip


def _reference_error(x, weights, targets, rank, bits, clip):
    qmax = 2 ** (bits - 1) - 1
    total = 0.0
    for t in range(x.shape[0]):
        row = x[t].clone()
        tail = row[rank:]
        scale = max(clip * float(tail.abs().max()) / qmax, 1e-8)
        row[rank:] = torch.tensor([min(max(round(float(v) / scale), -qmax - 1), qmax) * scale for v in tail],
                                  dtype=x.dtype)
        for w, y in zip(weights, targets):
            total += float(((w @ row) - y[t]).pow(2).sum())
    return total


def _heavy_tailed(n=64, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 5] *= 12.0  # one outlier channel, as in a real residual stream
    return x, g


def test_error_matches_the_per_token_reference():
    x, g = _heavy_tailed(n=12, d=10)
    weights = [torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(3, 10, generator=g, dtype=torch.float64)]
    targets = [x @ (w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)).T for w in weights]
    for rank, bits, clip in ((0, 4, 1.0), (2, 4, 0.75), (3, 8, 0.5)):
        got = act_clip_error(x, weights, targets, rank, bits, clip)
        assert abs(got - _reference_error(x, weights, targets, rank, bits, clip)) <= 1e-9 * max(1.0, got)


def test_candidates_are_exact_in_half_precision_and_span_the_range():
    cands = coarse_clips()
    assert cands[0] == 1.0 and abs(cands[-1] - MIN_CLIP) < 1e-12
    for c in cands + [c - CLIP_STEP for c in cands]:
        t = torch.tensor(c)
        assert float(t.bfloat16()) == c and float(t.half()) == c


def test_search_picks_the_smallest_error_of_what_it_tried_and_clips_heavy_tails():
    x, g = _heavy_tailed()
    w = torch.randn(16, x.shape[1], generator=g, dtype=torch.float64)
    best, errors = search_act_clip(x, [w], [x @ w.T], rank=0, bits=4)
    assert errors[best] == min(errors.values())
    assert best < 1.0 and errors[best] < errors[1.0]  # a clipped outlier costs less than a coarse grid
    assert len(errors) <= len(coarse_clips()) + 2
    assert abs(best - 0.5) < 1e-12 or best - CLIP_STEP in errors  # its neighbours were tried
    # the outlier channel kept in full precision (rank 1 after moving it first): less clipping pays
    perm = [5] + [i for i in range(x.shape[1]) if i != 5]
    best_r, errors_r = search_act_clip(x[:, perm], [w[:, perm]], [x @ w.T], rank=1, bits=4)
    assert errors_r[best_r] < errors[best]


def test_the_search_errors_are_the_definitions():
    x, g = _heavy_tailed(n=40, d=12)
    weights = [torch.randn(6, 12, generator=g, dtype=torch.float64), torch.randn(9, 12, generator=g, dtype=torch.float64)]
    targets = [x @ (w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64)).T for w in weights]
    for rank, sym in ((0, True), (3, True), (2, False)):
        _, errors = search_act_clip(x, weights, targets, rank, 4, sym)
        for c, e in errors.items():
            ref = act_clip_error(x, weights, targets, rank, 4, c, sym)
            assert abs(e - ref) <= 1e-9 * max(1.0, ref), (rank, sym, c)


def test_ties_keep_the_largest_ratio():
    x = torch.zeros(4, 8, dtype=torch.float64)
    w = torch.ones(2, 8, dtype=torch.float64)
    best, errors = search_act_clip(x, [w], [x @ w.T], rank=0, bits=4)
    assert best == 1.0 and set(errors.values()) == {0.0}
