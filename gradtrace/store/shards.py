"""Sharded parameters (FSDP2, tensor parallel): every rank's shards, combined into one series.

Each rank of a job with DTensor parameters records the statistics of its own shards, with no
communication (NOTE [shards without communication] in probes/grads.py), and says in its
meta which parameters are shards and how many ranks hold each element (`param_shards`:
1 for FSDP2, the replicated mesh dimensions' size for a `Replicate` placement, 0 for shards
that do not combine by sums of squares). A job's merged series show whole parameters:

    ‖g‖ = sqrt(Σ_ranks ‖g_rank‖² / replicas)

which is the norm of `full_tensor()`. Pure: stored numbers in, numbers out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from gradtrace.events import ParamStat, StepGradStats

_Key = tuple[int, str]


def combine_shards(
    per_rank: Sequence[Sequence[StepGradStats]], replicas: Mapping[str, int]
) -> list[StepGradStats]:
    """The first rank's recorded steps, with each sharded parameter's numbers combined over
    every rank. A parameter some rank did not record at that step is unknown (NaN) there."""
    first = list(per_rank[0]) if per_rank else []
    if not replicas:
        return first
    # One pass over every rank's steps: (step, optimizer) -> sharded parameters by name.
    by_rank = [
        {
            (stats.step, stats.optimizer): {p.name: p for p in stats.params if p.name in replicas}
            for stats in steps
        }
        for steps in per_rank
    ]
    combined = []
    for stats in first:
        key = (stats.step, stats.optimizer)
        if not by_rank[0][key]:
            combined.append(stats)
            continue
        params = tuple(
            _combined(p, [rank.get(key, {}).get(p.name) for rank in by_rank], replicas[p.name])
            if p.name in replicas
            else p
            for p in stats.params
        )
        combined.append(dataclasses.replace(stats, params=params))
    return combined


def _combined(first: ParamStat, parts: list[ParamStat | None], replicas: int) -> ParamStat:
    present = [part for part in parts if part is not None]
    if len(present) < len(parts) or replicas <= 0:
        nan = math.nan
        return dataclasses.replace(
            first, grad_norm=nan, param_norm=nan, zero_fraction=nan, update_norm=nan
        )
    numel = sum(part.numel for part in present)
    scale = math.sqrt(replicas)
    return dataclasses.replace(
        first,
        numel=numel // replicas,
        grad_norm=_norm([part.grad_norm for part in present]) / scale,
        param_norm=_norm([part.param_norm for part in present]) / scale,
        update_norm=_norm([part.update_norm for part in present]) / scale,
        # Replicas count each element equally often: they cancel out of the share.
        zero_fraction=(
            sum(part.zero_fraction * part.numel for part in present) / numel if numel else 0.0
        ),
    )


def _norm(norms: list[float]) -> float:
    """The L2 norm of the concatenation, from the parts' norms; NaN if any part is NaN.

    `math.hypot` neither overflows nor underflows in between, but it returns Inf over NaN;
    the whole's norm is NaN where a part holds NaN (or was not measured at this step).
    """
    if any(math.isnan(norm) for norm in norms):
        return math.nan
    return math.hypot(*norms)
