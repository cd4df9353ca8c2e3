"""Hand-built events for testing analysis and reporters without hooks or torch state."""

from __future__ import annotations

from gradtrace.events import (
    FORWARD,
    OPTIMIZER,
    CorruptionEvidence,
    SavedTensor,
    SourceLine,
    WriteEvent,
)


def source(line: int, code: str, file: str = "/work/model.py") -> SourceLine:
    return SourceLine(
        file=file,
        line=line,
        function="Block.forward",
        code=code,
        context_start=line - 1,
        context=("    h = self.gate(x)", f"    {code}", "    return h"),
    )


def saved(*, version: int = 0, step: int = 0, parameter: str | None = None) -> SavedTensor:
    return SavedTensor(
        shape=(8, 4),
        dtype="float32",
        device="cpu",
        type_name="torch.FloatTensor",
        version_saved=version,
        step=step,
        module="encoder.gate",
        source=source(41, "g = torch.sigmoid(h)"),
        grad_fn="SigmoidBackward0",
        output_nr=0,
        parameter=parameter,
    )


def write(op: str = "relu_", *, phase: str = FORWARD, step: int = 0, seq: int = 0) -> WriteEvent:
    owner = "Adam.step" if phase == OPTIMIZER else "encoder.act"
    return WriteEvent(
        seq=seq, op=op, owner=owner, phase=phase, step=step, source=source(42, "g.relu_()")
    )


def evidence(
    writes: tuple[WriteEvent, ...],
    *,
    version_now: int = 1,
    logged: bool = True,
    saved_tensor: SavedTensor | None = None,
    shared: tuple[WriteEvent, ...] = (),
) -> CorruptionEvidence:
    return CorruptionEvidence(
        saved=saved_tensor or saved(),
        node="SigmoidBackward0",
        version_now=version_now,
        writes=writes,
        writes_logged=logged,
        shared_writes=shared,
    )
