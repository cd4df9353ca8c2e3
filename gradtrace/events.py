"""Plain facts that probes record and every later stage reads.

Events hold ints, floats and strings only: never a tensor, module or frame, so that keeping
an event alive keeps nothing of the user's alive, and every event round-trips through JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Phases a write can happen in. "loop" is the user's own code outside any module forward,
# backward pass or optimizer step.
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
LOOP = "loop"


@dataclass(frozen=True)
class SourceLine:
    """A line of user code, with the few lines around it so a report needs no source file."""

    file: str
    line: int
    function: str
    code: str
    context_start: int = 0
    context: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceLine:
        return cls(**{**data, "context": tuple(data.get("context", ()))})


@dataclass(frozen=True)
class WriteEvent:
    """One mutating op that hit the memory of a tensor autograd had saved."""

    seq: int
    op: str
    owner: str
    phase: str
    step: int
    source: SourceLine | None


@dataclass(frozen=True)
class Span:
    """A timed piece of a traced step on one thread: a module's forward or backward, or an
    optimizer step. Times are wall clock (`time.time_ns()`), like the steps' end times."""

    step: int
    # FORWARD or BACKWARD (of module `name`) or OPTIMIZER (`name` is e.g. "AdamW.step").
    kind: str
    name: str
    # Native id of the thread it ran on (backward may run on autograd's device threads).
    thread: int
    # Nesting depth of the module call in forward (0: a root module, or an optimizer step).
    depth: int
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class TracedWrite:
    """One mutating op of a traced step, legal or not (`WriteEvent` is one that hit saved
    memory). `source` is the first user frame, without context lines."""

    step: int
    t_ns: int
    thread: int
    op: str
    owner: str
    phase: str
    source: SourceLine | None


@dataclass(frozen=True)
class SavedTensor:
    """A tensor autograd saved for backward, as it was when saved."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    type_name: str
    version_saved: int
    step: int
    module: str
    source: SourceLine | None
    # The autograd node that produced the tensor (PyTorch's error names it), if any.
    grad_fn: str | None = None
    output_nr: int = 0
    parameter: str | None = None


@dataclass(frozen=True)
class CorruptionEvidence:
    """What a probe knows when backward unpacks a saved tensor whose memory was written."""

    saved: SavedTensor
    # The backward node that needed the tensor, e.g. "SigmoidBackward0".
    node: str
    version_now: int
    # Writes that hit the saved tensor's memory after it was saved, oldest first.
    writes: tuple[WriteEvent, ...]
    # False when no write log ran (the light level): an empty `writes` then says nothing.
    writes_logged: bool
    # Writes after the save to other bytes of the same buffer that share its version counter
    # (another slice of one preallocated tensor), oldest first: they moved the version too.
    shared_writes: tuple[WriteEvent, ...] = ()


@dataclass(frozen=True, slots=True)  # slots: reading a long run back makes millions
class ParamStat:
    name: str
    module: str
    numel: int
    grad_norm: float
    param_norm: float
    zero_fraction: float
    # Position in the order gradients arrived during the last backward (0 = first); -1 unknown.
    arrival: int
    # L2 norm of what the optimizer step changed, ‖p_after - p_before‖ (opt-in: update_ratio);
    # NaN when not recorded.
    update_norm: float = math.nan


@dataclass(frozen=True, slots=True)
class ClipCall:
    """One `clip_grad_norm_` call before an optimizer step."""

    # The total norm it returned: the gradients' norm before clipping.
    norm_before: float
    max_norm: float
    norm_type: float


@dataclass(frozen=True, slots=True)
class StepGradStats:
    """One recorded step of one optimizer: the numbers and the facts around them."""

    step: int
    optimizer: str
    params: tuple[ParamStat, ...]
    # Trainable parameters of this optimizer that had no gradient at all: (param, module).
    missing: tuple[tuple[str, str], ...]
    # Leaf modules whose output held NaN/Inf this step, in forward order.
    nonfinite_outputs: tuple[str, ...]
    # Modules with trainable parameters whose output had no grad_fn (graph cut), first call.
    cut: tuple[str, ...]
    # Where modules first seen since the last record were called from: (path, line).
    new_sites: tuple[tuple[str, SourceLine | None], ...]
    # Parameter-free modules: L2 norm of the gradient that reached their output.
    output_grad_norms: tuple[tuple[str, float], ...] = ()
    # `clip_grad_norm_` calls since the previous optimizer step, in call order.
    clips: tuple[ClipCall, ...] = ()
    # ReLU-like modules on sampled steps: (module, units zero for the whole batch, units).
    dead_units: tuple[tuple[str, int, int], ...] = ()


# Gradient value histograms: right edges of the bins, ascending; the last bin is open above.
# Half-decades of magnitude from 1e-12 to 1e2 on both sides of zero: fixed for every
# parameter and step, so counting needs no min/max first and steps line up.
HISTOGRAM_MAGNITUDES = tuple(10.0 ** (k / 2) for k in range(-24, 5))
HISTOGRAM_EDGES = (*(-m for m in reversed(HISTOGRAM_MAGNITUDES)), *HISTOGRAM_MAGNITUDES)


@dataclass(frozen=True)
class GradHistogram:
    """How many of a parameter's gradient values fall in each bin of HISTOGRAM_EDGES."""

    step: int
    param: str
    counts: tuple[int, ...]


@dataclass(frozen=True)
class RankNorms:
    """One recorded step's per-parameter norms on every rank (`--check-ranks`).

    `grad_norms[r][i]` is rank r's gradient L2 norm of `params[i]`; likewise `param_norms`.
    Both are -1 where rank r had no gradient for the parameter (its norms were not taken).
    """

    step: int
    optimizer: str
    params: tuple[str, ...]
    grad_norms: tuple[tuple[float, ...], ...]
    param_norms: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class ProbeFailure:
    """A probe raised: it switched itself off at `step` and training went on without it.

    `where` is the innermost frame of gradtrace's own code the exception passed through
    (`gradtrace/probes/grads.py:123 in _before_step`): what a bug report needs.
    """

    probe: str
    step: int
    error: str
    message: str
    where: str
    # The torchrun rank it happened on, in a job's merged view; None otherwise.
    rank: int | None = None

    def describe(self) -> str:
        """One line for a terminal or a log."""
        on_rank = "" if self.rank is None else f" on rank {self.rank}"
        return (
            f"the {self.probe} probe failed at step {self.step}{on_rank} and is off for the "
            f"rest of the run ({self.error}: {self.message} at {self.where}); training went on "
            "unchanged. Please report this to gradtrace."
        )


def located_at(source: SourceLine | None) -> dict[str, Any]:
    """The `Finding` fields that point at a line of code; all None when it is unknown."""
    if source is None:
        return {"file": None, "line": None, "function": None, "code": None}
    return {
        "file": source.file,
        "line": source.line,
        "function": source.function,
        "code": source.code,
        "context_start": source.context_start,
        "context": source.context,
    }


@dataclass(frozen=True)
class Finding:
    """A diagnosed problem with its evidence and a pointer to the code that caused it.

    The flat fields name the culprit write (null when it was not seen); `saved_by` describes
    the tensor it corrupted. The JSON report is `asdict` of this, so field names are API.
    """

    kind: str
    message: str
    hint: str
    step: int
    phase: str | None
    op: str | None
    module: str | None
    file: str | None
    line: int | None
    function: str | None
    code: str | None
    saved_by: dict[str, Any]
    context_start: int = 0
    context: tuple[str, ...] = ()
    other_writes: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Gradient findings: the parameter concerned and the numbers behind the verdict.
    parameter: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # The torchrun rank that recorded it (for rank-divergence: the rank that deviates); None
    # outside distributed runs.
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def same_bug(self) -> tuple[object, ...]:
        """What makes two findings one bug: kind, the writing line and op, the saving line.

        The run store counts repeats of it (a bug inside a training loop fires every step);
        a job's terminal report shows it once for all the ranks it fired on at the same
        module and parameter.
        """
        saved = self.saved_by
        return (self.kind, self.file, self.line, self.op, saved.get("file"), saved.get("line"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            **{
                **data,
                "context": tuple(data.get("context", ())),
                "other_writes": tuple(data.get("other_writes", ())),
            }
        )
