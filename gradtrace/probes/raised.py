"""Read an exception that left the user's code: the line, op and module of a refused write.

Autograd refuses some in-place writes as they happen ("a leaf Variable that requires grad
is being used in an in-place operation", "Output 1 of Split is a view and is being modified
inplace"). Those checks run in the autograd kernel, above every observer gradtrace installs,
so no write event exists; and by the time the exception reaches a front end, the forward
hooks have unwound the module stack. The traceback still holds every frame: the innermost
one's instruction is the failing expression (its op), the innermost frame of user code is
the line to show, and the innermost frame whose `self` is a module names the module whose
code ran, whether it was entered through `__call__` or another method (`actor.log_prob(x)`
calling `self(x)`).
"""

from __future__ import annotations

import ast
import itertools
import linecache
import re
from types import CodeType, FrameType, TracebackType

from torch import nn

from gradtrace.analysis.refused import RefusedWrite
from gradtrace.events import FORWARD, LOOP
from gradtrace.probes.frames import is_user_code, source_line
from gradtrace.probes.modules import LOOP_OWNER, ModuleStackProbe

# Augmented assignments on tensors run these in-place ops (Tensor.__iadd__ -> add_, ...).
_AUGMENTED_OPS = {
    ast.Add: "add_",
    ast.Sub: "sub_",
    ast.Mult: "mul_",
    ast.Div: "div_",
    ast.Pow: "pow_",
    ast.FloorDiv: "floor_divide_",
    ast.Mod: "remainder_",
}
# The first `.name_(` of a line: the op when the failing expression cannot be located.
_METHOD_CALL = re.compile(r"\.(\w+_)\s*\(")


def refused_write(exc: BaseException, modules: ModuleStackProbe, step: int) -> RefusedWrite:
    """The facts of the write that raised `exc`, read from its traceback alone."""
    frames = _frames(exc.__traceback__)
    op = _op(*frames[-1]) if frames else None
    user = next(((f.f_code, line) for f, line, _ in reversed(frames) if _is_user(f)), None)
    module = next(
        (self for f, _, _ in reversed(frames) if isinstance(self := _self_of(f), nn.Module)),
        None,
    )
    return RefusedWrite(
        error_type=type(exc).__qualname__,
        message=str(exc),
        op=op,
        owner=LOOP_OWNER if module is None else modules.name_of(module),
        phase=LOOP if module is None else FORWARD,
        step=step,
        source=source_line(user),
    )


def _frames(tb: TracebackType | None) -> list[tuple[FrameType, int, int]]:
    """(frame, line, last instruction offset) from the outermost frame to the innermost."""
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno, tb.tb_lasti))
        tb = tb.tb_next
    return frames


def _is_user(frame: FrameType) -> bool:
    return is_user_code(frame.f_code)


def _self_of(frame: FrameType) -> object:
    """The frame's `self`, if it is a method's frame (read, never called)."""
    try:
        return frame.f_locals.get("self")
    except Exception:  # a frame whose locals cannot be read names no module
        return None


def _op(frame: FrameType, line: int, lasti: int) -> str | None:
    """The in-place op of the expression the frame was executing when it raised."""
    code = frame.f_code
    segment = _segment(code, lasti)
    if segment is not None:
        op = _op_of(segment)
        if op is not None:
            return op
    match = _METHOD_CALL.search(linecache.getline(code.co_filename, line))
    return match[1] if match else None


def _segment(code: CodeType, lasti: int) -> str | None:
    """The source text of the instruction at `lasti` (Python 3.11+ keeps its columns)."""
    positions = getattr(code, "co_positions", None)
    if positions is None or lasti < 0:
        return None
    start, end, start_col, end_col = next(itertools.islice(positions(), lasti // 2, None))
    if None in (start, end, start_col, end_col):
        return None
    lines = [linecache.getline(code.co_filename, n).encode() for n in range(start, end + 1)]
    if not lines or not lines[0]:
        return None
    # Columns are offsets into the UTF-8 bytes of the lines.
    if start == end:
        text = lines[0][start_col:end_col]
    else:
        text = lines[0][start_col:] + b"".join(lines[1:-1]) + lines[-1][:end_col]
    return text.decode(errors="replace")


def _op_of(segment: str) -> str | None:
    """`b.clamp_(0)` -> "clamp_", `p += 1` -> "add_", `p[0] = 1` -> "__setitem__"."""
    node = _parse(segment.strip())
    if isinstance(node, ast.AugAssign):
        return _AUGMENTED_OPS.get(type(node.op))
    if isinstance(node, ast.Assign):
        node = node.targets[0]
    elif isinstance(node, ast.Expr):
        node = node.value
    if isinstance(node, ast.Subscript):
        return "__setitem__"
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
        if isinstance(node.func, ast.Name):
            return node.func.id
    return None


def _parse(source: str) -> ast.AST | None:
    """One statement, or an expression (a segment may be the target of a statement)."""
    try:
        body = ast.parse(source).body
        return body[0] if len(body) == 1 else None
    except SyntaxError:
        pass
    try:
        return ast.parse(f"({source})", mode="eval").body
    except SyntaxError:
        return None
