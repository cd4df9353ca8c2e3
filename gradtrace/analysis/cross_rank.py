"""Ranks that disagree: after DDP's all-reduce every rank must hold the same gradients.

Pure: every rank's per-parameter norms in (`--check-ranks`), at most one finding out. Equal
gradients give equal norms bit for bit (the same kernel over the same bytes), so any gap
beyond rounding means a rank changed its gradients after the all-reduce (an in-place write
into a bucket view, a rank-dependent branch), or its parameters drifted (unsynchronised
buffers, a rank that skipped a step).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from gradtrace.events import Finding, RankNorms, SourceLine, located_at

RANK_DIVERGENCE = "rank-divergence"

# Relative gap between two ranks' norms that counts as different. DDP's norms are equal bit
# for bit; this only absorbs rounding across different GPU models in one job.
RELATIVE_TOLERANCE = 1e-6


def diagnose_ranks(
    checks: Sequence[RankNorms], sites: dict[str, SourceLine | None]
) -> list[Finding]:
    """The first step at which some parameter's gradient (or value) differs across ranks."""
    for check in checks:
        for quantity, table in (("gradient", check.grad_norms), ("value", check.param_norms)):
            per_param = [(param, [row[i] for row in table]) for i, param in enumerate(check.params)]
            diverged = [
                (param, values, ranks)
                for param, values in per_param
                if (ranks := _deviating_ranks(values))
            ]
            if diverged:
                return [_divergence(check, quantity, diverged, sites)]
    return []


def _deviating_ranks(values: list[float]) -> list[int]:
    """Ranks whose value differs from the one most ranks hold (rank 0's on a tie)."""
    keys = [_key(value) for value in values]
    counts = Counter(keys)
    reference = max(counts, key=lambda key: (counts[key], key == keys[0]))
    held = values[keys.index(reference)]
    return [rank for rank, value in enumerate(values) if not _same(value, held)]


def _key(value: float) -> float | str:
    return "nan" if math.isnan(value) else value


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))


def _divergence(
    check: RankNorms,
    quantity: str,
    diverged: list[tuple[str, list[float], list[int]]],
    sites: dict[str, SourceLine | None],
) -> Finding:
    param, values, ranks = diverged[0]
    module = param.rpartition(".")[0] or None
    per_rank = ", ".join(
        f"rank {rank} {'no gradient' if value < 0 else f'{value:.6g}'}"
        for rank, value in enumerate(values)
    )
    others = f" and {len(diverged) - 1} more parameters" if len(diverged) > 1 else ""
    if any(value < 0 for value in values):  # the deviating rank, or the ones it deviates from
        cause = "a rank computed no gradient for it (a rank-dependent branch skipped it)"
    elif quantity == "gradient":
        cause = (
            "a rank changed its gradients after DDP's all-reduce (an in-place write into "
            ".grad or a bucket view, a rank-dependent branch)"
        )
    else:
        cause = (
            "parameters drifted apart (a rank skipped or changed an update, or buffers are "
            "not synchronised)"
        )
    return Finding(
        kind=RANK_DIVERGENCE,
        message=(
            f"The {quantity} norm of {param}{others} differs across ranks at step "
            f"{check.step} ({per_rank}): {cause}."
        ),
        hint="Look for code that runs on some ranks only, or writes into .grad or "
        "parameters after backward; every rank must apply the same update.",
        step=check.step,
        phase=None,
        op=None,
        module=module,
        saved_by={},
        parameter=param,
        details={
            "quantity": quantity,
            "optimizer": check.optimizer,
            "norms": values,
            "ranks": ranks,
            "parameters": [name for name, _, _ in diverged],
        },
        rank=ranks[0],
        **located_at(sites.get(module) if module else None),
    )
