"""Gradient pathologies from recorded per-parameter statistics. Pure: stats in, findings out."""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from gradtrace.events import ClipCall, Finding, ParamStat, SourceLine, StepGradStats, located_at

NON_FINITE = "non-finite"
EXPLODING = "exploding"
VANISHING = "vanishing"
NO_GRAD = "no-grad"
DEAD_UNITS = "dead-units"
ALL_ZERO = "all-gradients-zero"

# Scalar series the GradScaler probe records (names shared with probes/amp.py).
FOUND_INF = "amp/found_inf"


@dataclass(frozen=True)
class Thresholds:
    """When a norm counts as a pathology. Defaults are deliberately conservative."""

    # A module's gradient norm above this multiple of its own running median explodes.
    explode_factor: float = 10.0
    # Steps of history the median needs before a jump can be judged.
    explode_history: int = 10
    # A module whose gradient norm stays below this fraction of its parameter norm vanishes.
    vanish_ratio: float = 1e-7
    # ...and below this fraction of the median ratio over all modules at the same step.
    vanish_relative: float = 1e-3
    # Recorded steps a parameter needs before "never gets a gradient" or "vanishing" is said.
    min_steps: int = 2
    # GradScaler skipping this many iterations in a row is a bug, not loss-scale calibration.
    max_scaler_skips: int = 10
    # A ReLU with at least this fraction of units dead in every sampled step (and at least
    # `min_steps` samples) has died: those units no longer learn.
    dead_fraction: float = 0.5


@dataclass(frozen=True)
class ModuleNorms:
    """Per-module series: sqrt of summed squares over the module's own parameters.

    `param` has points only where parameter norms were taken (sampled steps).
    """

    grad: dict[str, list[tuple[int, float]]]
    param: dict[str, list[tuple[int, float]]]
    global_grad: list[tuple[int, float]]
    # ‖Δp‖/‖p‖ of the module's own parameters, on steps where updates were recorded.
    update_ratio: dict[str, list[tuple[int, float]]]


def module_norms(steps: Sequence[StepGradStats]) -> ModuleNorms:
    """Aggregate parameter norms into module and global norms (what clip_grad_norm_ sees).

    Several optimizers stepping in one step (one record each) are one model: one point.
    """
    grad: dict[str, list[tuple[int, float]]] = {}
    param: dict[str, list[tuple[int, float]]] = {}
    update_ratio: dict[str, list[tuple[int, float]]] = {}
    global_grad: list[tuple[int, float]] = []
    by_step: dict[int, list[ParamStat]] = {}
    for stats in steps:
        by_step.setdefault(stats.step, []).extend(stats.params)
    for step, params in by_step.items():
        # Norms are combined with hypot, never by squaring: a float64 norm of 1e308 is
        # finite, its square is not (and `x**2` raises OverflowError).
        grads: dict[str, list[float]] = {}
        params_taken: dict[str, list[float]] = {}
        updates: dict[str, list[float]] = {}
        for p in params:
            grads.setdefault(p.module, []).append(p.grad_norm)
            if not math.isnan(p.param_norm):  # NaN: not taken at this step
                params_taken.setdefault(p.module, []).append(p.param_norm)
            if not math.isnan(p.update_norm):
                updates.setdefault(p.module, []).append(p.update_norm)
        for module, norms in grads.items():
            grad.setdefault(module, []).append((step, math.hypot(*norms)))
        for module, norms in params_taken.items():
            param.setdefault(module, []).append((step, math.hypot(*norms)))
        for module, norms in updates.items():
            taken = params_taken.get(module)
            ratio = _ratio(math.hypot(*norms), math.hypot(*taken) if taken else math.nan)
            update_ratio.setdefault(module, []).append((step, ratio))
        if params:
            global_grad.append((step, math.hypot(*(p.grad_norm for p in params))))
    return ModuleNorms(grad=grad, param=param, global_grad=global_grad, update_ratio=update_ratio)


def update_ratio(stat: ParamStat) -> float:
    """‖Δp‖/‖p‖ of one parameter at one step; NaN when the update was not recorded."""
    return _ratio(stat.update_norm, stat.param_norm)


def _ratio(update: float, param: float) -> float:
    if math.isnan(update):
        return math.nan
    return update / param if param else math.inf if update else 0.0


@dataclass(frozen=True)
class ClipStep:
    """Gradient clipping at one step: the global norm before and after, and the limit."""

    step: int
    # What clip_grad_norm_ returned; several calls (one per model, say) combine as one norm.
    norm_before: float
    # The global gradient norm the optimizers then saw.
    norm_after: float
    max_norm: float

    @property
    def clipped(self) -> bool:
        return self.norm_before > self.max_norm


def clipping(steps: Sequence[StepGradStats]) -> list[ClipStep]:
    """Recorded steps that called clip_grad_norm_, in step order (empty if none did)."""
    calls: dict[int, list[ClipCall]] = {}
    grad_norms: dict[int, list[float]] = {}
    for stats in steps:
        calls.setdefault(stats.step, []).extend(stats.clips)
        grad_norms.setdefault(stats.step, []).extend(p.grad_norm for p in stats.params)
    return [
        ClipStep(
            step=step,
            norm_before=_combined_norm(made),
            norm_after=math.hypot(*grad_norms[step]),
            max_norm=min(call.max_norm for call in made),
        )
        for step, made in sorted(calls.items())
        if made
    ]


def _combined_norm(calls: Sequence[ClipCall]) -> float:
    """The p-norm over all the calls' gradients together (NaN when their p differ)."""
    kinds = {call.norm_type for call in calls}
    if len(kinds) != 1:
        return math.nan
    (p,) = kinds
    norms = [call.norm_before for call in calls]
    if any(math.isnan(n) for n in norms):
        return math.nan
    peak = max(norms)
    if math.isinf(p) or peak == 0 or math.isinf(peak):
        return peak
    # Scaled by the largest: the p-th power of a finite float64 norm can overflow.
    return peak * sum((n / peak) ** p for n in norms) ** (1 / p)


def diagnose_gradients(
    steps: Sequence[StepGradStats],
    sites: dict[str, SourceLine | None],
    scalars: dict[str, list[tuple[int, float]]] | None = None,
    thresholds: Thresholds | None = None,
) -> list[Finding]:
    """Every gradient finding the recorded steps support, most severe kinds first."""
    limits = thresholds or Thresholds()
    norms = module_norms(steps)
    findings = [
        *_scaler_skips((scalars or {}).get(FOUND_INF, []), limits),
        *_non_finite(steps, sites),
        *_all_zero(steps, sites, limits),
        *_exploding(norms, sites, limits),
        *_vanishing(norms, sites, limits),
        *_no_grad(steps, sites, limits),
        *_dead_units(steps, sites, limits),
    ]
    return findings


def scaler_skips(found_inf: Sequence[tuple[int, float]]) -> tuple[int, int]:
    """(iterations GradScaler skipped, longest run of consecutive skips)."""
    total = longest = current = 0
    for _, flag in found_inf:
        current = current + 1 if flag else 0
        total += bool(flag)
        longest = max(longest, current)
    return total, longest


def _scaler_skips(found_inf: Sequence[tuple[int, float]], limits: Thresholds) -> list[Finding]:
    """Occasional skips are GradScaler calibrating its scale; a long run means real NaN/Inf."""
    total, longest = scaler_skips(found_inf)
    if longest < limits.max_scaler_skips:
        return []
    step = next(step for step, flag in found_inf if flag)
    return [
        _finding(
            NON_FINITE,
            f"GradScaler skipped {longest} iterations in a row ({total} in all): the gradients "
            "hold Inf/NaN at every loss scale, so training has stopped updating.",
            "Find the op producing Inf/NaN (rerun with bf16 autocast or without AMP to see "
            "where the non-finite origin is reported), or check the data for NaN inputs.",
            step=step,
            module="GradScaler",
            parameter=None,
            site=None,
            details={"skipped": total, "longest_run": longest},
        )
    ]


def _non_finite(
    steps: Sequence[StepGradStats], sites: dict[str, SourceLine | None]
) -> list[Finding]:
    """The first step with a NaN/Inf module output or gradient, and where it started.

    Forward hooks fire as modules finish, children before parents, so the first non-finite
    output in that order is the innermost module that produced it.
    """
    for stats in steps:
        bad = [p for p in stats.params if not math.isfinite(p.grad_norm)]
        if not bad and not stats.nonfinite_outputs:
            continue
        first = min(bad, key=lambda p: (p.arrival < 0, p.arrival)) if bad else None
        origin = stats.nonfinite_outputs[0] if stats.nonfinite_outputs else None
        module = origin or (first.module if first else "?")
        if origin:
            where = f"the output of {origin} held NaN/Inf in the forward pass"
        else:
            where = f"the first non-finite gradient in backward order is {first.name}"
        affected = f" ({len(bad)} of {len(stats.params)} parameters' gradients)" if bad else ""
        return [
            _finding(
                NON_FINITE,
                f"NaN/Inf at step {stats.step}: {where}{affected}.",
                "Look for log/sqrt/div of values that reach 0 or negative numbers, overflow "
                "under fp16 (use bf16 or GradScaler), or a learning rate that blows up.",
                step=stats.step,
                module=module,
                parameter=first.name if first else None,
                site=sites.get(module),
                details={
                    "first_nonfinite_output": origin,
                    "nonfinite_outputs": list(stats.nonfinite_outputs),
                    "first_nonfinite_grad": first.name if first else None,
                    "nonfinite_grads": len(bad),
                },
            )
        ]
    return []


def _exploding(
    norms: ModuleNorms, sites: dict[str, SourceLine | None], limits: Thresholds
) -> list[Finding]:
    """The first step at which some module's norm jumps over its own running median."""
    jumps: dict[int, list[tuple[float, str, float, float]]] = {}
    for module, series in norms.grad.items():
        history = RunningMedian()  # the finite values before the one judged
        for step, value in series:
            if len(history) >= limits.explode_history:
                median = history.median()
                if median > 0 and math.isfinite(value) and value > limits.explode_factor * median:
                    jumps.setdefault(step, []).append((value / median, module, value, median))
                    break
            if math.isfinite(value):
                history.add(value)
    if not jumps:
        return []
    step = min(jumps)
    factor, module, value, median = max(jumps[step])
    return [
        _finding(
            EXPLODING,
            f"Gradient norm of {module} jumped to {value:.3g} at step {step}, {factor:.0f}× its "
            f"running median {median:.3g}"
            + (f" ({len(jumps[step])} modules jumped together)." if len(jumps[step]) > 1 else "."),
            "Lower the learning rate or add warm-up, clip gradients "
            "(torch.nn.utils.clip_grad_norm_), or check the input batch.",
            step=step,
            module=module,
            parameter=None,
            site=sites.get(module),
            details={
                "grad_norm": value,
                "median": median,
                "modules": [m for _, m, _, _ in sorted(jumps[step], reverse=True)],
            },
        )
    ]


class RunningMedian:
    """The median of the values added so far, as `statistics.median` gives it.

    Two heaps (the lower half as a max-heap of negated values, the upper half as a min-heap)
    make each `add` O(log n): the exploding check asks for the median of every prefix of a
    module's series, which re-sorting made quadratic in the run's length.
    """

    def __init__(self) -> None:
        self._low: list[float] = []
        self._high: list[float] = []

    def __len__(self) -> int:
        return len(self._low) + len(self._high)

    def add(self, value: float) -> None:
        if self._low and value > -self._low[0]:
            heapq.heappush(self._high, value)
        else:
            heapq.heappush(self._low, -value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    def median(self) -> float:
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


def _vanishing(
    norms: ModuleNorms, sites: dict[str, SourceLine | None], limits: Thresholds
) -> list[Finding]:
    """Modules whose updates are vanishingly small *compared with the rest of the model*.

    Tiny gradients everywhere mean the loss is (near) zero, e.g. a memorised batch, not a
    vanishing-gradient problem; only modules far below the model's own median ratio count.
    """
    ratios: dict[str, dict[int, float]] = {}
    for module, series in norms.grad.items():
        taken = dict(norms.param.get(module, ()))
        ratios[module] = {}
        param = None
        for step, value in series:
            # Parameter norms are sampled; between samples the last one stands.
            param = taken.get(step, param)
            if param:
                ratios[module][step] = value / param
    medians: dict[int, float] = {}
    for step in {step for by_step in ratios.values() for step in by_step}:
        values = [r[step] for r in ratios.values() if step in r and math.isfinite(r[step])]
        medians[step] = statistics.median(values) if values else math.nan
    findings = []
    for module, by_step in ratios.items():
        if len(by_step) < limits.min_steps:
            continue
        if all(
            0 < r < limits.vanish_ratio and r < limits.vanish_relative * medians[step]
            for step, r in by_step.items()
        ):
            last_step, last = max(by_step.items())
            findings.append(
                _finding(
                    VANISHING,
                    f"Gradients of {module} vanish: ‖grad‖/‖param‖ stayed below "
                    f"{limits.vanish_ratio:g} and {limits.vanish_relative:g}× the model's "
                    f"median for all {len(by_step)} recorded steps (last {last:.2g}, median "
                    f"{medians[last_step]:.2g}).",
                    "Check saturating activations (sigmoid/tanh), initialisation and "
                    "normalisation before this module, or residual paths around it.",
                    step=last_step,
                    module=module,
                    parameter=None,
                    site=sites.get(module),
                    details={"ratio": last, "median_ratio": medians[last_step]},
                )
            )
    return findings


def _no_grad(
    steps: Sequence[StepGradStats], sites: dict[str, SourceLine | None], limits: Thresholds
) -> list[Finding]:
    """Parameters that never got a gradient while others did.

    `.grad` None on every recorded step means the graph to them is cut; one finding points
    at the starved module that ran *last* in forward order (everything upstream of a cut
    starves, so the path to the loss ends in or right after its call). A `.grad` that exists
    but is exactly zero every time can also be a gradient that cancels (a bias before a
    normalisation or a mean-difference loss, a dead ReLU): that is a separate finding.
    """
    recorded = len({stats.step for stats in steps})
    if recorded < limits.min_steps:
        return []
    missing: dict[tuple[str, str], int] = {}
    zero: dict[tuple[str, str], int] = {}
    updated = False
    for stats in steps:
        for name, module in stats.missing:
            missing[name, module] = missing.get((name, module), 0) + 1
        for p in stats.params:
            if p.numel == 0:  # an empty shard (FSDP2 on more ranks than rows): no evidence
                continue
            if p.grad_norm == 0.0:
                zero[p.name, p.module] = zero.get((p.name, p.module), 0) + 1
            else:
                updated = True
    if not updated:
        return []
    never = [key for key, count in missing.items() if count >= recorded]
    only_zero = [
        key for key in zero if key not in never and missing.get(key, 0) + zero[key] >= recorded
    ]
    findings = []
    if never:
        findings.append(_cut_finding(never, steps, sites, recorded))
    if only_zero:
        findings.append(_zero_finding(only_zero, steps, sites, recorded))
    return findings


def _all_zero(
    steps: Sequence[StepGradStats], sites: dict[str, SourceLine | None], limits: Thresholds
) -> list[Finding]:
    """Every gradient exactly zero on every recorded step: the model learns nothing.

    `_no_grad` speaks of some parameters while others learn; here none does, which points
    at the loss (constant, or detached from the output) rather than at one module.
    """
    recorded = [stats for stats in steps if stats.params]
    if len({stats.step for stats in recorded}) < limits.min_steps:
        return []
    if any(p.grad_norm != 0.0 for stats in recorded for p in stats.params):
        return []
    # Sites are listed as forwards finish, children first: the last is the outermost module.
    module = next(reversed(sites), None) or recorded[-1].params[0].module
    parameters = sorted({p.name for stats in recorded for p in stats.params})
    return [
        _finding(
            ALL_ZERO,
            f"Every gradient was exactly zero at all {len(recorded)} recorded steps "
            f"({_count(parameters)}): the loss does not depend on the parameters, so the "
            "model learns nothing.",
            "Check the loss: cross_entropy over a 1-output head is always 0 (use "
            "binary_cross_entropy_with_logits, or one logit per class), and a loss built from "
            "a detached value, a constant or fully masked targets has no gradient.",
            step=recorded[-1].step,
            module=module,
            parameter=None,
            site=sites.get(module),
            details={"recorded_steps": len(recorded), "parameters": len(parameters)},
        )
    ]


def dead_unit_fractions(steps: Sequence[StepGradStats]) -> dict[str, list[tuple[int, float]]]:
    """Per ReLU-like module: the fraction of its units dead at each sampled step."""
    fractions: dict[str, list[tuple[int, float]]] = {}
    for stats in steps:
        for module, dead, units in stats.dead_units:
            fractions.setdefault(module, []).append((stats.step, dead / units))
    return fractions


def _dead_units(
    steps: Sequence[StepGradStats], sites: dict[str, SourceLine | None], limits: Thresholds
) -> list[Finding]:
    """ReLUs that output zero for whole batches in most of their units, every time sampled.

    Such a unit passes no gradient to the weights before it, so once dead it stays dead
    (a large learning-rate step or a very negative bias usually did it).
    """
    units = {module: n for stats in steps for module, _, n in stats.dead_units}
    dead = {
        module: series
        for module, series in dead_unit_fractions(steps).items()
        if len(series) >= limits.min_steps
        and all(fraction >= limits.dead_fraction for _, fraction in series)
    }
    if not dead:
        return []
    forward_order = {module: i for i, module in enumerate(sites)}
    first = min(dead, key=lambda m: forward_order.get(m, len(forward_order)))
    last_step, fraction = dead[first][-1]
    listed = ", ".join(
        f"{module} ({series[-1][1]:.0%} of {units[module]})" for module, series in dead.items()
    )
    return [
        _finding(
            DEAD_UNITS,
            f"Dead ReLU units: {listed} output zero for the whole batch in at least "
            f"{limits.dead_fraction:.0%} of their units at every one of the "
            f"{len(dead[first])} sampled steps; those units pass no gradient and stopped "
            "learning.",
            "Lower the learning rate or add warm-up, check the initialisation and biases of "
            "the layer feeding the ReLU (a normalisation before it helps), or use LeakyReLU/GELU.",
            step=last_step,
            module=first,
            parameter=None,
            site=sites.get(first),
            details={
                "dead_fraction": fraction,
                "units": units[first],
                "modules": {module: series[-1][1] for module, series in dead.items()},
            },
        )
    ]


def _cut_finding(
    never: list[tuple[str, str]],
    steps: Sequence[StepGradStats],
    sites: dict[str, SourceLine | None],
    recorded: int,
) -> Finding:
    forward_order = {module: i for i, module in enumerate(sites)}
    modules = {module for _, module in never}
    cuts = [c for stats in steps for c in stats.cut if c in modules]
    last = cuts[0] if cuts else max(modules, key=lambda m: forward_order.get(m, -1))
    names = [name for name, _ in never]
    how = (
        f"the output of {last} had no grad_fn although it has trainable parameters"
        if cuts
        else f"the last of them in forward order is {last}: the path to the loss ends at or "
        "right after the line that calls it"
    )
    return _finding(
        NO_GRAD,
        f"{_count(names)} never got a gradient in {recorded} recorded steps while others did "
        f"({_listed(names)}): {how}.",
        "Remove the .detach()/.data/torch.no_grad()/torch.tensor(x.item()) on the path "
        "from this module to the loss, or freeze it on purpose with requires_grad_(False).",
        step=steps[-1].step,
        module=last,
        parameter=names[0],
        site=sites.get(last),
        details={"parameters": names, "graph_cut_at": last if cuts else None, "grad": None},
    )


def _zero_finding(
    only_zero: list[tuple[str, str]],
    steps: Sequence[StepGradStats],
    sites: dict[str, SourceLine | None],
    recorded: int,
) -> Finding:
    names = [name for name, _ in only_zero]
    module = only_zero[0][1]
    return _finding(
        NO_GRAD,
        f"{_count(names)} got only exactly-zero gradients in {recorded} recorded steps while "
        f"others learned ({_listed(names)}): either the graph to them is cut (a zero .grad "
        "survives zero_grad(set_to_none=False)) or their gradient cancels exactly.",
        "A bias right before BatchNorm/LayerNorm or a loss that subtracts means gets an exactly "
        "zero gradient and can go; otherwise look for a cut (.detach(), .data, no_grad) or a "
        "dead ReLU on the path from this module to the loss.",
        step=steps[-1].step,
        module=module,
        parameter=names[0],
        site=sites.get(module),
        details={"parameters": names, "graph_cut_at": None, "grad": "zero"},
    )


def _count(names: list[str]) -> str:
    return f"{len(names)} parameter{'s' if len(names) > 1 else ''}"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", …" if len(names) > 6 else "")


def _finding(
    kind: str,
    message: str,
    hint: str,
    *,
    step: int,
    module: str,
    parameter: str | None,
    site: SourceLine | None,
    details: dict[str, object],
) -> Finding:
    return Finding(
        kind=kind,
        message=message,
        hint=hint,
        step=step,
        phase=None,
        op=None,
        module=module,
        saved_by={},
        parameter=parameter,
        details=details,
        **located_at(site),
    )
