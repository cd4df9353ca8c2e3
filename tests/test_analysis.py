"""Culprit analysis on hand-built evidence: pure, no hooks."""

from __future__ import annotations

import math

from events_factory import evidence, saved, write

from gradtrace.analysis.culprits import (
    INPLACE_WRITE,
    SILENT_OVERWRITE,
    Wording,
    diagnose,
    explain,
    forward_op,
    learn_wording,
    pytorch_message,
)
from gradtrace.analysis.grad_health import clipping, diagnose_gradients, module_norms
from gradtrace.events import OPTIMIZER, ClipCall, ParamStat, StepGradStats


def test_intact_tensor_is_no_finding() -> None:
    assert diagnose(evidence((), version_now=0)) is None


def test_changed_version_names_the_first_write() -> None:
    finding = diagnose(evidence((write("relu_", seq=1), write("add_", seq=2))))
    assert finding is not None
    assert finding.kind == INPLACE_WRITE
    assert (finding.file, finding.line, finding.op, finding.module) == (
        "/work/model.py",
        42,
        "relu_",
        "encoder.act",
    )
    assert finding.saved_by["node"] == "SigmoidBackward0"
    assert finding.saved_by["op"] == "sigmoid"
    assert finding.saved_by["line"] == 41
    assert finding.saved_by["version_saved"] == 0
    assert finding.saved_by["version_now"] == 1
    assert [w["op"] for w in finding.other_writes] == ["add_"]
    assert "model.py:42 in encoder.act (relu_) overwrote" in finding.message
    assert "relu instead of relu_" in finding.hint


def test_unchanged_version_with_a_write_is_silent() -> None:
    finding = diagnose(evidence((write("mul_"),), version_now=0))
    assert finding is not None
    assert finding.kind == SILENT_OVERWRITE
    assert "silently overwrote" in finding.message
    assert ".data" in finding.hint


def test_write_to_another_slice_of_the_buffer_is_named() -> None:
    """A loud check with no write on the saved bytes: the slice writes that moved the shared
    version counter are the culprits, and the finding says they hit another slice."""
    finding = diagnose(
        evidence((), version_now=2, shared=(write("copy_", seq=1), write("copy_", seq=2)))
    )
    assert finding is not None
    assert finding.kind == INPLACE_WRITE
    assert (finding.line, finding.op, finding.module) == (42, "copy_", "encoder.act")
    assert "another slice of the same buffer" in finding.message
    assert "and 1 more write there" in finding.message
    assert len(finding.other_writes) == 1
    assert "torch.stack" in finding.hint
    assert finding.details == {"shared_buffer": True}
    # A write on the saved bytes themselves wins; slice writes never make a silent finding.
    direct = diagnose(evidence((write("relu_"),), shared=(write("copy_"),)))
    assert direct is not None and direct.op == "relu_" and not direct.details
    assert diagnose(evidence((), version_now=0, shared=(write("copy_"),))) is None


def test_light_level_points_at_the_saver_and_full_level() -> None:
    finding = diagnose(evidence((), logged=False))
    assert finding is not None
    assert finding.file is None
    assert finding.saved_by["line"] == 41
    assert "--level full" in finding.message


def test_hints_follow_the_class_of_bug() -> None:
    optimizer = diagnose(evidence((write("addcdiv_", phase=OPTIMIZER),)))
    assert optimizer is not None and "optimizer.step()" in optimizer.hint
    assignment = diagnose(evidence((write("copy_"),)))
    assert assignment is not None and "torch.where" in assignment.hint
    carried = diagnose(evidence((write("add_", step=3),), saved_tensor=saved(step=2)))
    assert carried is not None and "detach()" in carried.hint
    parameter = diagnose(evidence((write("mul_"),), saved_tensor=saved(parameter="fc.weight")))
    assert parameter is not None and "parameter fc.weight" in parameter.hint


TORCH_213 = (
    "one of the variables needed for gradient computation has been modified by an inplace "
    "operation: [torch.FloatTensor [1]], which is output 0 of Sigmoid, is at version 1; "
    "expected version 0 instead. Hint: enable anomaly detection to find the operation that "
    "failed to compute its gradient, with torch.autograd.set_detect_anomaly(True, check_nan=False)."
)


def test_message_in_this_torchs_words() -> None:
    wording = learn_wording(TORCH_213)
    assert wording.forward_names
    assert wording.hint.startswith(" Hint: enable anomaly detection")
    text = pytorch_message(evidence((write(),), version_now=2), wording)
    assert text == (
        "one of the variables needed for gradient computation has been modified by an "
        "inplace operation: [torch.FloatTensor [8, 4]], which is output 0 of Sigmoid, is at "
        "version 2; expected version 0 instead." + wording.hint
    )


def test_older_wording_keeps_node_names() -> None:
    wording = learn_wording(TORCH_213.replace("of Sigmoid,", "of SigmoidBackward0,"))
    assert not wording.forward_names
    text = pytorch_message(evidence((write(),)), wording)
    assert ", which is output 0 of SigmoidBackward0, is at version 1;" in text
    assert learn_wording(None) == Wording()


def test_explain_names_both_lines() -> None:
    finding = diagnose(evidence((write(),)))
    assert finding is not None
    text = explain(finding)
    assert "/work/model.py:42 in Block.forward" in text
    assert "saved at /work/model.py:41" in text


def test_forward_op_strips_backward_suffix() -> None:
    assert forward_op("SigmoidBackward0") == "sigmoid"
    assert forward_op("AddmmBackward0") == "addmm"
    assert forward_op("CustomThing") == "customthing"


def test_huge_finite_norms_combine_without_overflow() -> None:
    """A float64 model's gradient norm may be 1e308: finite, though its square is not."""
    params = tuple(
        ParamStat(f"fc.{name}", "fc", 4, 1e308, 1.0, 0.0, index, update_norm=1.0)
        for index, name in enumerate(("weight", "bias"))
    )
    clips = (ClipCall(1e308, 1.0, 2.0), ClipCall(1e308, 1.0, 2.0))
    stats = StepGradStats(0, "SGD.step", params, (), (), (), (), clips=clips)
    norms = module_norms([stats])
    assert norms.grad["fc"] == [(0, math.hypot(1e308, 1e308))]
    assert norms.global_grad == [(0, math.hypot(1e308, 1e308))]
    [clip] = clipping([stats])
    assert math.isclose(clip.norm_before, math.hypot(1e308, 1e308))
    diagnose_gradients([stats], {})  # no OverflowError anywhere in the analysis
