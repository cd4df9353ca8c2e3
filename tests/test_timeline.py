"""Timeline probe: module spans, optimizer spans and writes on the traced steps only."""

from __future__ import annotations

import gc
import inspect
import threading
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.modules.module as torch_module
from torch import nn
from trace_format import check_trace_format, inside, spans

import gradtrace
from gradtrace.analysis.report import build_report
from gradtrace.errors import GradtraceError
from gradtrace.probes.timeline import TraceSteps, _ParamWatch
from gradtrace.reporters.chrome_trace import render_trace
from gradtrace.session import Session
from gradtrace.store import load_run


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 8)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


MODULES = {"Sequential", "0", "0.fc", "0.act", "1", "1.fc", "1.act", "2"}


def test_trace_steps_parse_ranges_and_refuse_garbage() -> None:
    steps = TraceSteps.parse("0-2, 10")
    assert [s for s in range(12) if s in steps] == [0, 1, 2, 10]
    assert not any(s in TraceSteps.parse("none") for s in range(5))
    assert [s for s in range(5) if s in TraceSteps.parse([3, 1])] == [1, 3]
    for bad in ("2-1", "a", "1,,2", "-3"):
        with pytest.raises(GradtraceError, match="Bad trace steps"):
            TraceSteps.parse(bad)


def test_module_spans_nest_on_the_traced_steps_only(tmp_path: Path) -> None:
    model, optimizer = make()
    with gradtrace.trace(model, out=tmp_path / "run", trace_steps=[1]):
        for _ in range(3):
            train_step(model, optimizer)
    run = load_run(tmp_path / "run")
    assert {span.step for span in run.spans} == {1}
    document = render_trace(build_report(run))
    check_trace_format(document)
    forward, backward = spans(document, "forward"), spans(document, "backward")
    assert {e["args"]["name"] for e in forward} == MODULES
    assert {e["args"]["name"] for e in backward} == MODULES
    for kind in (forward, backward):
        by_name = {e["args"]["name"]: e for e in kind}
        for name in MODULES - {"Sequential"}:
            parent = name.rpartition(".")[0] or "Sequential"
            assert inside(by_name[name], by_name[parent]), (name, parent)
    # Backward runs after forward, innermost modules in reverse order of their forward.
    assert min(e["ts"] for e in backward) >= max(e["ts"] + e["dur"] for e in forward)
    by_name = {e["args"]["name"]: e for e in backward}
    assert by_name["2"]["ts"] <= by_name["1"]["ts"] <= by_name["0"]["ts"]
    [step] = spans(document, "optimizer")
    assert step["name"] == "AdamW.step"
    assert step["ts"] >= max(e["ts"] + e["dur"] for e in backward)


def test_hooks_exist_only_during_traced_steps_and_keep_nothing_alive(tmp_path: Path) -> None:
    model, optimizer = make()
    session = Session(tmp_path / "run", trace_steps="0")
    baseline = len(torch_module._global_forward_pre_hooks)
    with session:
        traced_hooks = len(torch_module._global_forward_pre_hooks)
        assert session.tracing_writes  # step 0 is traced: its writes go into trace.json
        output = model(torch.randn(4, 8))
        watched = weakref.ref(output)
        output.square().mean().backward()
        optimizer.step()  # step 0 ends: the next one is not traced
        assert len(torch_module._global_forward_pre_hooks) == traced_hooks - 1
        assert not session.tracing_writes
        # Only the gradient probe's own arrival hook is left on each parameter.
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
        del output
        gc.collect()
        assert watched() is None
        train_step(model, optimizer)
    assert traced_hooks == baseline + 2  # the module stack's and the timeline's
    assert {span.step for span in load_run(tmp_path / "run").spans} == {0}


def test_a_run_stopped_inside_a_traced_step_leaves_no_parameter_hook(tmp_path: Path) -> None:
    model, _ = make()
    with Session(tmp_path / "run", trace_steps="0"):
        model(torch.randn(4, 8)).square().mean().backward()  # no optimizer.step()
        assert any(isinstance(h.__self__, _ParamWatch) for h in accumulate_hooks(model))
    assert not any(isinstance(h.__self__, _ParamWatch) for h in accumulate_hooks(model))
    assert {span.kind for span in load_run(tmp_path / "run").spans} == {"forward", "backward"}


def accumulate_hooks(model: nn.Module) -> list:
    """The hooks' own bound methods, out of the probes' guards (gradtrace/probes/guard.py)."""
    return [
        inspect.unwrap(h)
        for p in model.parameters()
        for h in (p._post_accumulate_grad_hooks or {}).values()
    ]


def test_each_thread_gets_its_own_track(tmp_path: Path) -> None:
    model, optimizer = make()
    with Session(tmp_path / "run", trace_steps="0-1"):
        train_step(model, optimizer)
        worker = threading.Thread(target=train_step, args=(model, optimizer), name="trainer")
        worker.start()
        worker.join()
    run = load_run(tmp_path / "run")
    threads = {span.step: run.threads[span.thread] for span in run.spans}
    assert threads == {0: threading.current_thread().name, 1: "trainer"}
    document = render_trace(build_report(run))
    check_trace_format(document)
    names = {e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    assert {"MainThread", "trainer"} <= names
