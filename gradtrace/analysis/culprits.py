"""Name the write that corrupted a saved tensor: evidence in, finding out.

Pure functions: no torch, no hooks. The saved-tensor probe gathers `CorruptionEvidence` at
unpack time and asks `diagnose` what it means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradtrace.events import (
    BACKWARD,
    FORWARD,
    OPTIMIZER,
    CorruptionEvidence,
    Finding,
    SavedTensor,
    SourceLine,
    WriteEvent,
    located_at,
)

INPLACE_WRITE = "inplace-write"
SILENT_OVERWRITE = "silent-overwrite"
NO_GRAD_PARAMETER_WRITE = "no-grad-parameter-write"
GRAPH_CUT = "graph-cut"

# How many writes besides the culprit a finding lists.
MAX_OTHER_WRITES = 5

_ASSIGNMENT_OPS = frozenset(
    {
        "copy_",
        "fill_",
        "index_put_",
        "_index_put_impl_",
        "masked_fill_",
        "masked_scatter_",
        "index_fill_",
        "index_copy_",
        "scatter_",
        "zero_",
    }
)


def diagnose(evidence: CorruptionEvidence) -> Finding | None:
    """Return the finding the evidence supports, or None if the saved tensor is intact.

    A changed version is what PyTorch itself would reject (loud). An unchanged version with
    writes into the tensor's memory means a write bypassed the version counter (`.data`,
    another alias) and backward is about to compute wrong gradients without any error.
    """
    saved = evidence.saved
    loud = evidence.version_now != saved.version_saved
    if not loud and not evidence.writes:
        return None
    kind = INPLACE_WRITE if loud else SILENT_OVERWRITE
    writes = evidence.writes
    # NOTE [shared version counter]: slices of one buffer share its version counter, so a
    # write to `h[1]` moves the version of a saved `h[0]` without touching its bytes. Those
    # writes are the culprits only when nothing wrote the saved bytes themselves.
    shared = loud and not writes and bool(evidence.shared_writes)
    if shared:
        writes = evidence.shared_writes
    culprit = writes[0] if writes else None
    if shared:
        message = _shared_message(saved, culprit, evidence)
        hint = SHARED_BUFFER_HINT
    else:
        message = _message(kind, saved, culprit, evidence)
        hint = _hint(kind, saved, culprit, writes_logged=evidence.writes_logged)
    saved_by = _saved_by(evidence)
    return Finding(
        kind=kind,
        message=message,
        hint=hint,
        step=saved.step if culprit is None else culprit.step,
        phase=None if culprit is None else culprit.phase,
        op=None if culprit is None else culprit.op,
        module=None if culprit is None else culprit.owner,
        saved_by=saved_by,
        other_writes=tuple(_write_summary(w) for w in writes[1 : 1 + MAX_OTHER_WRITES]),
        details={"shared_buffer": True} if shared else {},
        **located_at(None if culprit is None else culprit.source),
    )


def forward_op(node: str) -> str:
    """`SigmoidBackward0` -> `sigmoid`: the forward op a backward node belongs to."""
    name = node
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.lower() or node


@dataclass(frozen=True)
class Wording:
    """How this torch words its version-check error, learnt from torch itself.

    torch 2.13 names the node by its forward op ("output 0 of Sigmoid") where older releases
    said "SigmoidBackward0", and the closing hint changed between releases too.
    """

    forward_names: bool = False
    hint: str = ""


_PROBE_NODE = "SigmoidBackward0"


def learn_wording(message: str | None) -> Wording:
    """Read the wording off PyTorch's own error for `sigmoid(x).add_(1)` (see _torch_compat)."""
    if not message or " of " not in message:
        return Wording()
    forward_names = f" of {_PROBE_NODE}," not in message and " of Sigmoid," in message
    _, _, hint = message.partition(" instead.")
    return Wording(forward_names=forward_names, hint=hint)


def pytorch_message(evidence: CorruptionEvidence, wording: Wording) -> str:
    """The error PyTorch raises for a changed saved tensor, in this torch's own words.

    Installing saved-tensor hooks switches PyTorch's own check off, so gradtrace raises this
    itself: code that matches on PyTorch's wording keeps working.
    """
    saved = evidence.saved
    return version_message(
        saved.type_name,
        saved.shape,
        saved.grad_fn,
        saved.output_nr,
        version_now=evidence.version_now,
        version_saved=saved.version_saved,
        wording=wording,
    )


def version_message(
    type_name: str,
    shape: tuple[int, ...],
    grad_fn: str | None,
    output_nr: int,
    *,
    version_now: int,
    version_saved: int,
    wording: Wording,
) -> str:
    """PyTorch's in-place error text from the saved tensor's bare facts."""
    sizes = ", ".join(str(n) for n in shape)
    text = (
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{type_name} [{sizes}]]"
    )
    if grad_fn:
        node = _forward_name(grad_fn) if wording.forward_names else grad_fn
        text += f", which is output {output_nr} of {node},"
    return (
        text + f" is at version {version_now}; expected version {version_saved}"
        f" instead.{wording.hint}"
    )


def _forward_name(node: str) -> str:
    return re.sub(r"Backward\d*$", "", node) or node


def explain(finding: Finding) -> str:
    """Plain-text attribution appended to the RuntimeError and used by text reporters."""
    lines = [f"gradtrace: {finding.message}"]
    if finding.file is not None:
        lines.append(f"    {finding.file}:{finding.line} in {finding.function}")
        lines.append(f"        {finding.code}")
    saved_source = finding.saved_by.get("file")
    if saved_source:
        lines.append(
            f"  saved at {saved_source}:{finding.saved_by['line']} in "
            f"{finding.saved_by['function']}"
        )
        lines.append(f"        {finding.saved_by['code']}")
    lines.append(f"  hint: {finding.hint}")
    return "\n".join(lines)


def _message(
    kind: str, saved: SavedTensor, culprit: WriteEvent | None, evidence: CorruptionEvidence
) -> str:
    target = _describe_saved(saved, evidence.node)
    if culprit is None:
        if evidence.writes_logged:
            return (
                f"{target} was modified in place (version {saved.version_saved} -> "
                f"{evidence.version_now}) by a write gradtrace could not see "
                "(compiled code, a custom kernel or another thread)."
            )
        return (
            f"{target} was modified in place (version {saved.version_saved} -> "
            f"{evidence.version_now}); rerun with --level full to name the line that wrote it."
        )
    where = culprit.source
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    verb = "overwrote" if kind == INPLACE_WRITE else "silently overwrote"
    return f"{at} in {culprit.owner} ({culprit.op}) {verb} {target}."


SHARED_BUFFER_HINT = (
    "Slices of one preallocated tensor share its version counter: keep each result in a list "
    "and torch.stack (or torch.cat) them, or clone() the slice an op reads."
)


def _shared_message(saved: SavedTensor, culprit: WriteEvent, evidence: CorruptionEvidence) -> str:
    where = culprit.source
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    more = len(evidence.shared_writes) - 1
    also = f" (and {more} more write{'s' if more != 1 else ''} there)" if more else ""
    return (
        f"{at} in {culprit.owner} ({culprit.op}) wrote another slice of the same buffer as "
        f"{_describe_saved(saved, evidence.node)}{also}: the slices share one version counter, "
        f"so the saved slice moved from version {saved.version_saved} to "
        f"{evidence.version_now} although its values did not change."
    )


def _describe_saved(saved: SavedTensor, node: str) -> str:
    what = f"parameter {saved.parameter}" if saved.parameter else "the tensor"
    return f"{what} that {saved.module} ({forward_op(node)}) saved for backward"


def _hint(kind: str, saved: SavedTensor, culprit: WriteEvent | None, *, writes_logged: bool) -> str:
    if culprit is None:
        if not writes_logged:
            return (
                "Rerun with --level full to name the line that wrote to it; then clone the "
                "tensor before writing to it in place, or use the out-of-place op."
            )
        return "Clone the tensor before writing to it in place, or use the out-of-place op."
    op = culprit.op
    if culprit.phase == OPTIMIZER:
        return (
            "Call optimizer.step() only after every backward that uses these parameters "
            "(or run the forward again after the step)."
        )
    if kind == SILENT_OVERWRITE:
        return (
            f"Writes through .data or another alias skip autograd's version check: use the "
            f"out-of-place form of {op} (or clone() first) so backward sees the original values."
        )
    if culprit.step != saved.step:
        return (
            "The tensor was saved in an earlier step and written in this one: detach() state "
            "you carry across steps (e.g. an RNN hidden state) or clone() it before writing."
        )
    if saved.parameter:
        return (
            f"Don't modify parameter {saved.parameter} in place between its forward and "
            "backward; do it under torch.no_grad() after backward, or out of place."
        )
    if op in _ASSIGNMENT_OPS:
        return (
            "Assigning into a tensor autograd saved corrupts backward: build a new tensor "
            "(torch.where, torch.cat, or x = x.clone() before the assignment)."
        )
    if culprit.phase in (FORWARD, BACKWARD) and op.endswith("_"):
        return (
            f"Use the out-of-place op ({op.rstrip('_')} instead of {op}, or inplace=False), "
            "or clone() the tensor before writing to it."
        )
    return f"Use the out-of-place form of {op}, or clone() the tensor before writing to it."


def _saved_by(evidence: CorruptionEvidence) -> dict[str, object]:
    saved = evidence.saved
    where = located_at(saved.source)
    return {
        "node": evidence.node,
        "op": forward_op(evidence.node),
        "module": saved.module,
        "file": where["file"],
        "line": where["line"],
        "function": where["function"],
        "code": where["code"],
        "shape": list(saved.shape),
        "dtype": saved.dtype,
        "device": saved.device,
        "version_saved": saved.version_saved,
        "version_now": evidence.version_now,
        "parameter": saved.parameter,
        "step": saved.step,
    }


def _write_summary(write: WriteEvent) -> dict[str, object]:
    source = write.source
    return {
        "op": write.op,
        "module": write.owner,
        "phase": write.phase,
        "step": write.step,
        "file": source.file if source else None,
        "line": source.line if source else None,
        "code": source.code if source else None,
    }


def untracked_activation_write(write: WriteEvent, activation_module: str) -> Finding:
    """A write autograd did not record (through `.detach()`, `.data` or under no_grad) into a
    module's output that is part of the graph: backward treats it as if nothing happened, so
    the gradients through that output are silently wrong (nothing saved it, so no check
    fails)."""
    where = write.source
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    return Finding(
        kind=SILENT_OVERWRITE,
        message=(
            f"{at} in {write.owner} ({write.op}) silently overwrote the output of "
            f"{activation_module} through an alias autograd does not track (.detach(), .data) "
            "or under no_grad: autograd did not record the write, so "
            "gradients flow as if the values were unchanged."
        ),
        hint=(
            f"Write out of place so autograd sees it (e.g. h = h.masked_fill(mask, 0) or "
            f"h = h * scale instead of {write.op} through .detach()/.data)."
        ),
        step=write.step,
        phase=write.phase,
        op=write.op,
        module=write.owner,
        saved_by={},
        details={"untracked": True, "output_of": activation_module},
        **located_at(where),
    )


def no_grad_parameter_write(write: WriteEvent, parameter: str) -> Finding:
    """A parameter that requires grad written in place under no_grad inside a forward, before
    it is used: its gradient misses that op. A warning: weight re-normalisation done this way
    on purpose exists, but is usually meant to be differentiated."""
    where = write.source
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    return Finding(
        kind=NO_GRAD_PARAMETER_WRITE,
        message=(
            f"{at} in {write.owner} ({write.op}) wrote parameter {parameter} in place under "
            "torch.no_grad() inside a forward: its gradient will not account for that op."
        ),
        hint=(
            "Compute the transformed weight out of place with grad enabled (w = f(self.weight)) "
            "and use it, or move the update out of the forward (between steps)."
        ),
        step=write.step,
        phase=write.phase,
        op=write.op,
        module=write.owner,
        saved_by={},
        parameter=parameter,
        details={"level": "warning"},
        **located_at(where),
    )


def graph_cut(
    where: SourceLine | None,
    *,
    op: str,
    owner: str,
    step: int,
    parameters: list[str],
    complete: bool,
) -> Finding:
    """A value taken out of the graph (`op` is `_local_scalar_dense` for `.item()` and
    `float()`, `detach` for `.detach()`, `.numpy()` and `torch.tensor(t)`) whose parameters
    then got no gradient: the loss was built from the copy, not the tensor.

    `complete` is False when the parameters were sampled (the graph behind the value was
    larger than the probe walks), so the count is a lower bound.
    """
    at = f"{where.file.rsplit('/', 1)[-1]}:{where.line}" if where else "unknown line"
    count = f"{len(parameters)}{'' if complete else '+'}"
    plural = "" if count == "1" else "s"
    if op == "detach":
        how = "took a value out of the graph as a detached copy (detach)"
        hint = (
            "Build the loss from the tensor itself, not from a copy made by .detach(), "
            ".numpy() or torch.tensor(t); detach only what must not train (targets, "
            "logging). A deliberate freeze: take those parameters out of the optimizer, or "
            "mark the line '# gradtrace: ignore[graph-cut]'."
        )
    else:
        how = f"read a value out of the graph as a Python number ({op})"
        hint = (
            "Build the loss from the tensor itself (e.g. log_prob * ret, not "
            "log_prob.item() * ret); keep .item() for logging, and never rebuild a loss with "
            "torch.tensor(..., requires_grad=True)."
        )
    return Finding(
        kind=GRAPH_CUT,
        message=(
            f"{at} in {owner} {how} and backward never reached it: the {count} "
            f"parameter{plural} behind it got no gradient."
        ),
        hint=hint,
        step=step,
        phase=None,
        op=op,
        module=owner,
        saved_by={},
        details={"parameters": parameters},
        **located_at(where),
    )
