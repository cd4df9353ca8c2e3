"""In-place writes autograd refused at the write itself: PyTorch's error in, finding out.

Pure: the probe side (probes/raised.py) reads the failing line, op and module off the
exception's traceback; this module knows PyTorch's wording of its leaf and view checks and
what to do about each. Those checks run in the autograd kernel, before any dispatcher
observer sees the op, so no write event exists for them: the traceback is the evidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradtrace.events import FORWARD, Finding, SourceLine, located_at

INPLACE_REFUSED = "inplace-refused"

# The checks, by the words PyTorch raises them with (torch 2.13; substrings, so a changed
# tail or added advice still matches). Order matters: the view-of-leaf text contains the
# leaf text's tail.
LEAF = "leaf"
VIEW_OF_LEAF = "view-of-leaf"
MULTIPLE_VIEWS = "multiple-views"
CUSTOM_FUNCTION_VIEW = "custom-function-view"
NO_GRAD_VIEW = "no-grad-view"
INFERENCE_TENSOR = "inference-tensor"

_OUTPUT_OF = r"Output (?P<output>\d+) of (?P<node>\S+) is a view and is being modified inplace"
_CHECKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (VIEW_OF_LEAF, re.compile(r"a view of a leaf Variable that requires grad is being used")),
    (LEAF, re.compile(r"a leaf Variable that requires grad is being used in an in-place")),
    (MULTIPLE_VIEWS, re.compile(_OUTPUT_OF + r"\. This view is the output of a function that")),
    (CUSTOM_FUNCTION_VIEW, re.compile(_OUTPUT_OF + r"\. This view was created inside a custom")),
    (NO_GRAD_VIEW, re.compile(r"A view was created in no_grad mode and")),
    (
        INFERENCE_TENSOR,
        re.compile(
            r"Inplace update to inference tensor outside InferenceMode"
            r"|A view was created in inference mode and"
        ),
    ),
)

# Characters of PyTorch's message kept in the finding's details.
MAX_ERROR = 1_000


@dataclass(frozen=True)
class RefusedWrite:
    """What the traceback of an exception says about the write that raised it."""

    error_type: str
    message: str
    # The in-place op, as read from the failing expression (e.g. "clamp_", "add_"); None when
    # the expression could not be read.
    op: str | None
    # Module path of the innermost module whose code was running, or the training loop.
    owner: str
    phase: str
    step: int
    # The innermost line of user code on the traceback.
    source: SourceLine | None


def refused_check(message: str) -> tuple[str, dict[str, str]] | None:
    """Which of autograd's in-place checks this error message is, with what it names."""
    for check, pattern in _CHECKS:
        match = pattern.search(message)
        if match is not None:
            return check, {k: v for k, v in match.groupdict().items() if v is not None}
    return None


def diagnose_refused(write: RefusedWrite) -> Finding | None:
    """The finding for an exception autograd raised at an in-place write, else None."""
    if write.error_type != "RuntimeError":
        return None
    found = refused_check(write.message)
    if found is None:
        return None
    check, named = found
    op = write.op or "an in-place op"
    where = write.source
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    return Finding(
        kind=INPLACE_REFUSED,
        message=f"{at} in {write.owner} ({op}) wrote in place to {_target(check, named)}; "
        "autograd refused the write and raised.",
        hint=_hint(check, write.op, forward=write.phase == FORWARD),
        step=write.step,
        phase=write.phase,
        op=write.op,
        module=write.owner,
        saved_by={},
        details={"check": check, "error": write.message[:MAX_ERROR], **named},
        **located_at(where),
    )


def _target(check: str, named: dict[str, str]) -> str:
    node = re.sub(r"Backward\d*$", "", named.get("node", "")) or "?"
    output = named.get("output", "?")
    return {
        LEAF: "a leaf tensor that requires grad (a parameter, or a tensor made with "
        "requires_grad=True)",
        VIEW_OF_LEAF: "a view of a leaf tensor that requires grad (a slice of a parameter)",
        MULTIPLE_VIEWS: f"output {output} of {node}, one of several views it returns "
        "(chunk, split, unbind)",
        CUSTOM_FUNCTION_VIEW: f"output {output} of the custom Function {node}, a view",
        NO_GRAD_VIEW: "a view created under torch.no_grad(), with grad mode on",
        INFERENCE_TENSOR: "a tensor created under torch.inference_mode(), outside it",
    }[check]


def _hint(check: str, op: str | None, *, forward: bool) -> str:
    out_of_place = (
        f"the out-of-place op ({op.rstrip('_')} instead of {op})"
        if op and op.endswith("_") and not op.startswith("__")
        else "the out-of-place op"
    )
    if check == LEAF and forward:
        return (
            "Don't write into a parameter inside forward: compute a new tensor out of place "
            "(e.g. prompt = self.prompt + delta, not self.prompt += delta)."
        )
    if check == LEAF:
        return (
            "Update parameters by hand under torch.no_grad(), as torch.optim does "
            "(with torch.no_grad(): p.add_(p.grad, alpha=-lr)), or use a torch.optim optimizer."
        )
    if check == VIEW_OF_LEAF:
        return (
            "Assign into a parameter only under torch.no_grad(); inside the model, build a new "
            "tensor instead (torch.where, torch.cat, or x = p.clone() before assigning)."
        )
    if check == MULTIPLE_VIEWS:
        return (
            f"Use {out_of_place} on the piece, or clone() it first: the outputs of chunk(), "
            "split() and unbind() cannot be modified in place."
        )
    if check == CUSTOM_FUNCTION_VIEW:
        return (
            "clone() the custom Function's output before writing to it in place, or use "
            f"{out_of_place}."
        )
    if check == NO_GRAD_VIEW:
        return (
            "Create the view and write to it both inside torch.no_grad() (untracked) or both "
            f"outside it (tracked), or use {out_of_place}."
        )
    return (
        "clone() the tensor before writing to it (a clone is a normal tensor), or create it "
        "under torch.no_grad() instead of torch.inference_mode()."
    )
