"""A tracing session: owns every probe, hands what they collect to its sinks (the run writer
first), and removes them all on close."""

from __future__ import annotations

import functools
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import torch
from torch import nn

from gradtrace import _native
from gradtrace.analysis.refused import diagnose_refused
from gradtrace.analysis.report import Report, build_report
from gradtrace.errors import GradtraceError
from gradtrace.events import (
    HISTOGRAM_EDGES,
    Finding,
    GradHistogram,
    ProbeFailure,
    RankNorms,
    Span,
    StepGradStats,
    TracedWrite,
)
from gradtrace.options import RunOptions
from gradtrace.probes import _torch_compat, ignored
from gradtrace.probes.amp import GradScalerProbe
from gradtrace.probes.backward_steps import BackwardStepProbe
from gradtrace.probes.clip import GradClipProbe
from gradtrace.probes.deferred import DeferredQueue, Ready, deliver, stack_scalars
from gradtrace.probes.frames import CallerFinder
from gradtrace.probes.fsdp import FsdpWritesProbe
from gradtrace.probes.grads import GradStatsProbe
from gradtrace.probes.guard import ProbeGuard
from gradtrace.probes.histograms import GradHistogramProbe
from gradtrace.probes.modules import ModuleStackProbe
from gradtrace.probes.native import NativeCoreProbe
from gradtrace.probes.raised import refused_write
from gradtrace.probes.rank_check import RankCheckProbe
from gradtrace.probes.readouts import ReadoutProbe
from gradtrace.probes.saved import LiveSaved, SavedTensorProbe
from gradtrace.probes.steps import StepProbe
from gradtrace.probes.timeline import TimelineProbe, TraceSteps
from gradtrace.probes.writes import WriteLogProbe
from gradtrace.ranks import Rank, agree_on_job_dir, current_rank
from gradtrace.sinks import Sink
from gradtrace.store.format import FAILED, OK, RUNNING
from gradtrace.store.jobs import StoreJobs
from gradtrace.store.reader import load_run
from gradtrace.store.writer import RunWriter

DEFAULT_RUNS_DIR = "gradtrace-runs"

_active: Session | None = None


def default_run_dir(name: str) -> Path:
    """`./gradtrace-runs/<time>-<name>`, never an existing directory.

    In a torchrun job every rank gets rank 0's choice (each rank then records into its own
    `rank-N` directory inside it).
    """
    proposed = _new_run_dir(name)
    rank = current_rank()
    return proposed if rank is None else agree_on_job_dir(proposed, rank)


def _new_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = name.replace(".", "-").replace("/", "-")
    base = Path(DEFAULT_RUNS_DIR) / f"{stamp}-{stem}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class Session:
    """One traced execution, writing one run directory.

    `start()` installs the probes, `close()` removes them (safe to call twice, and called on
    every exit path by the front ends). Only one session may be active at a time: hooks are
    global, and two sessions would attribute each other's writes. Under torchrun (RANK and
    WORLD_SIZE set) `out` is the job's directory and this rank writes `out/rank-<RANK>`.

    The session collects; its sinks consume (gradtrace/sinks.py). The run writer is always
    the first; front ends add others (`add_sink`: live TensorBoard) and what is made from
    the run once it is read back (`after_close`: trace.json, the findings count, the
    summary). The session itself renders nothing.
    """

    def __init__(
        self,
        out: str | Path,
        options: RunOptions | None = None,
        *,
        model: nn.Module | None = None,
        grad_stats: bool = True,
        core: str | None = None,
        argv: Sequence[str] | None = None,
        front_end: str | None = None,
        **values: Any,
    ) -> None:
        """`options` (default: every default) with `values` (its fields by name) replacing
        them, as `RunOptions.of` does; `argv` and `front_end` go into the run's meta.
        `options.tensorboard` is not the collector's: the front end's outputs read it
        (`gradtrace.outputs.attach_outputs`)."""
        options = RunOptions.of(options, **values)
        self.options = options
        self.rank: Rank | None = current_rank()
        self.job_dir = Path(out)
        self.run_dir = self.job_dir if self.rank is None else self.rank.run_dir(self.job_dir)
        self.level = options.level
        # "python" forces the Python probes; None takes the native core where it builds.
        self._core_choice = core
        # Findings so far, one per bug (`Finding.same_bug`); after close, every finding.
        self.findings: list[Finding] = []
        self._bugs: set[tuple[object, ...]] = set()
        self._findings_lock = threading.Lock()
        self._meta: dict[str, Any] = {} if argv is None else {"argv": list(argv)}
        if front_end is not None:
            self._meta["front_end"] = front_end
        self._model = model
        self._every = options.every
        # Opt-in: a device copy of the stepped parameters during each recorded step.
        self._update_ratio = options.update_ratio
        # Off only to measure what the gradient statistics cost (scripts/bench_overhead.py).
        self._grad_stats = grad_stats
        self._trace_steps = TraceSteps.parse(options.trace_steps)
        self._timeline: TimelineProbe | None = None
        self._stack: ExitStack | None = None
        self._writer: RunWriter | None = None
        # The run writer, then the sinks `add_sink` opened; empty until tracing starts.
        self._sinks: tuple[Sink, ...] = ()
        self._sink_openers: list[Callable[[], Sink]] = []
        self._jobs: StoreJobs | None = None
        self._pid = os.getpid()
        # Probes that failed and switched themselves off (NOTE [probe boundary] in guard.py).
        self.probe_failures: list[ProbeFailure] = []
        self._writes: WriteLogProbe | NativeCoreProbe | None = None
        self.core = _native.PYTHON
        self._steps = StepProbe(self._end_step, guard=self._guard("step counter"))
        self._deferred = DeferredQueue()
        # step -> name -> value, until the step's record is written.
        self._logged: dict[int, dict[str, float | torch.Tensor]] = {}
        self._modules = ModuleStackProbe(guard=self._guard("module stack"))
        self._forwards_at_step_end = 0
        self._checkpointed_stored = 0
        # Whether the gradient statistics saw sharded (DTensor) parameters.
        self._sharded = False
        self._rank_check = (
            RankCheckProbe(self._deferred, self._store_rank_norms, guard=self._guard("rank check"))
            if options.check_ranks
            else None
        )
        # Gradient value histograms every N optimizer steps (0: never).
        self._histograms = (
            GradHistogramProbe(
                options.grad_histograms,
                self._deferred,
                self._store_histograms,
                guard=self._guard("gradient histograms"),
            )
            if options.grad_histograms > 0
            else None
        )
        self._after_close: list[Callable[[Report], None]] = []

    @property
    def step(self) -> int:
        return self._steps.step

    # Diagnostics: read-only views of what the probes hold, for tests and bug reports.

    def live_saved_count(self) -> int | None:
        """Saved tensors the write log holds as live right now; None without a write log
        (level light). Between steps it is 0: anything more is a tensor kept alive."""
        return None if self._writes is None else self._writes.live_count()

    @property
    def tracing_writes(self) -> bool:
        """Whether every write is handed to the timeline now: only during the steps chosen
        for trace.json (`trace_steps`); outside them a write costs no timeline work."""
        return self._writes is not None and self._writes.tracing_writes

    def start(self) -> Session:
        global _active
        _torch_compat.check_supported()
        if _active is not None:
            raise GradtraceError(
                f"A gradtrace session is already tracing into '{_active.run_dir}'; "
                "stop it before starting another."
            )
        core = None if self._core_choice == _native.PYTHON else _native.load()
        self.core = _native.NATIVE if core is not None else _native.PYTHON
        writer = RunWriter(self.run_dir, on_stop=_say)
        writer.set_meta(
            status=RUNNING,
            core=self.core,
            started_ns=time.time_ns(),
            level=self.level,
            every=self._every,
            update_ratio=self._update_ratio,
            **({"histogram_edges": list(HISTOGRAM_EDGES)} if self._histograms is not None else {}),
            torch=torch.__version__,
            python=platform.python_version(),
            platform=sys.platform,
            **self._rank_meta(),
            **self._meta,
        )
        # Probes keep this stack and add to it later (hooks on parameters first seen in a
        # step), so it must be the one `close()` unwinds: no `pop_all()` copy.
        stack = ExitStack()
        jobs = StoreJobs()
        self._writer = writer  # a probe failing as it installs is recorded too
        self._sinks = (writer,)
        try:
            stack.callback(writer.close)
            for open_sink in self._sink_openers:
                sink = open_sink()
                stack.callback(sink.close)
                self._sinks = (*self._sinks, sink)
            stack.callback(jobs.close)  # first: the store thread's last records reach every sink
            ignored.collect()
            stack.callback(ignored.stop)
            self._install(stack, core)
        except BaseException:
            self._writer = None
            self._sinks = ()
            stack.close()
            raise
        self._stack = stack
        self._jobs = jobs
        self._pid = os.getpid()
        _active = self
        return self

    def _install(self, stack: ExitStack, core: ModuleType | None) -> None:
        modules = self._modules
        if self._model is not None:
            modules.add_root(self._model)
        callers = CallerFinder()
        modules.install(stack)
        self._steps.install(stack)
        grads = self._install_grad_stats(stack, callers) if self._grad_stats else None
        BackwardStepProbe(
            self._steps,
            None if grads is None else grads.record_backward,
            guard=self._guard("backward steps"),
        ).install(stack)
        full = self.level == "full"
        readouts = (
            ReadoutProbe(
                modules,
                self._steps,
                callers,
                self._add_finding,
                guard=self._guard("read-out check"),
            )
            if full
            else None
        )
        if readouts is not None:
            readouts.install(stack)
        if core is not None:
            native = NativeCoreProbe(
                core,
                modules,
                self._steps,
                self._add_finding,
                observe_writes=full,
                guard=self._guard("native core"),
                readout_seen=None if readouts is None else readouts.seen,
            )
            native.install(stack)
            self._writes = native if full else None
        else:
            # The write log's map of live saved tensors by storage (level "full" only).
            live = LiveSaved() if full else None
            saved = SavedTensorProbe(
                modules,
                self._steps,
                callers,
                self._add_finding,
                live=live,
                guard=self._guard("saved-tensor check"),
            )
            saved.install(stack)
            if live is not None:
                self._writes = WriteLogProbe(
                    live,
                    modules,
                    self._steps,
                    callers,
                    guard=self._guard("write log"),
                    on_finding=self._add_finding,
                )
                if readouts is not None:
                    self._writes.readout_seen = readouts.seen
                self._writes.install(stack)
        if full:
            FsdpWritesProbe(modules, guard=self._guard("FSDP2 writes")).install(stack)
        self._timeline = TimelineProbe(
            modules,
            self._trace_steps,
            on_recording=self._trace_writes,
            guard=self._guard("timeline"),
        )
        self._timeline.install(stack)

    def _trace_writes(self, recording: bool) -> None:
        """While the timeline records a step, the write log hands it every write."""
        writes, timeline = self._writes, self._timeline
        if writes is not None and timeline is not None:
            writes.trace_writes(timeline.add_write if recording else None)

    def _install_grad_stats(self, stack: ExitStack, callers: CallerFinder) -> GradStatsProbe:
        grads = GradStatsProbe(
            self._modules,
            self._steps,
            callers,
            self._deferred,
            self._store_grad_stats,
            every=self._every,
            update_ratio=self._update_ratio,
            compare_ranks=None if self._rank_check is None else self._rank_check.compare,
            histograms=self._histograms,
            on_shards=self._store_shards,
            guard=self._guard("gradient statistics"),
        )
        scaler = GradScalerProbe(
            self._steps,
            self._deferred,
            self._store_scalars,
            grads.end_iteration,
            guard=self._guard("AMP loss scale"),
        )
        grads.install(stack)
        scaler.install(stack)
        GradClipProbe(grads.note_clip, guard=self._guard("gradient clipping")).install(stack)
        return grads

    def _guard(self, probe: str) -> ProbeGuard:
        """The switch a probe runs behind: its failure is recorded, training goes on."""
        return ProbeGuard(probe, self._probe_failed, step=lambda: self.step)

    def _probe_failed(self, failure: ProbeFailure) -> None:
        """Say it once on stderr now (the run may never reach its summary) and store it."""
        if not self._in_owner():
            return
        self.probe_failures.append(failure)
        print(f"gradtrace: {failure.describe()}", file=sys.stderr, flush=True)
        for sink in self._sinks:
            sink.add_probe_failure(failure)

    def log(self, **values: float | torch.Tensor) -> None:
        """Record scalars (e.g. `loss=loss`) for the step they belong to.

        That is the step in progress, or the one that just ended when no forward has run
        since (`loss = train_step(batch); session.log(loss=loss)`). Tensors are not read
        here: they are read one step late with the step's other device values, so logging a
        CUDA loss never synchronises the host.
        """
        step = self.step
        if step > 0 and self._modules.forwards == self._forwards_at_step_end:
            step -= 1
        self._logged.setdefault(step, {}).update(values)

    def store_ignored(self) -> None:
        """Store the `gradtrace.ignore` blocks entered so far (analysis silences findings
        inside them): now, so that a killed run keeps them, and again at close."""
        writer, jobs = self._writer, self._jobs
        if writer is not None and jobs is not None and self._in_owner():
            jobs.submit(functools.partial(writer.set_meta, ignored=ignored.collected()))

    def record_error(self, exc: BaseException) -> None:
        """Turn an exception leaving the traced code into a finding, if it is one autograd
        raised at an in-place write; front ends call it before `close`. The exception itself
        is neither changed nor kept."""
        if self._stack is not None:
            self._guard("refused writes")(self._record_refused)(exc)

    def _record_refused(self, exc: BaseException) -> None:
        finding = diagnose_refused(refused_write(exc, self._modules, self.step))
        if finding is not None:
            self._add_finding(finding)

    def close(
        self,
        *,
        status: str = OK,
        exit_code: int | None = 0,
        exception: dict[str, str] | None = None,
    ) -> None:
        """Remove every probe and finish the run record. Idempotent.

        In a forked child it does nothing (NOTE [fork]).
        """
        global _active
        if not self._in_owner():
            return
        stack, self._stack = self._stack, None
        if stack is None:
            return
        writer = self._writer
        try:
            if writer is not None:
                # Here, not on the store thread (NOTE [at exit] in store/jobs.py), and
                # before the run's final status.
                self._flush(finished=False, here=True)
                writer.set_meta(
                    status=status,
                    exit_code=exit_code,
                    exception=exception,
                    ended_ns=time.time_ns(),
                    cuda_device=_cuda_device_name(),
                    notices=self._notices(),
                    steps_counted_by=self._steps.counted_by,
                    ignored=ignored.collected(),
                )
        finally:
            _active = None
            stack.close()
        if writer is not None:
            report = build_report(load_run(self.run_dir))
            self.findings = [stored.finding for stored in report.findings]
            for callback in self._after_close:
                callback(report)

    def add_sink(self, open_sink: Callable[[], Sink]) -> None:
        """Hand every record to the sink `open_sink` returns, after the run writer.

        `open_sink` is called as tracing starts, once the run directory exists; an error
        there fails `start` with nothing left installed. The sink is closed with the others
        on every exit path.
        """
        if self._stack is not None:
            raise GradtraceError("Add sinks before the session starts.")
        self._sink_openers.append(open_sink)

    def after_close(self, callback: Callable[[Report], None]) -> None:
        """Call `callback` with the run's report once `close` has read the run back, in the
        order registered (front ends: trace.json, the findings count, the summary).

        Close reads the whole store and derives the findings once; every consumer shares
        them, which on a long run (millions of rows at 20 000 steps of a 150-parameter
        model) spares reading and analysing it again for each.
        """
        self._after_close.append(callback)

    def _rank_meta(self) -> dict[str, int | str]:
        if self.rank is None:
            return {}
        return {
            "rank": self.rank.rank,
            "world_size": self.rank.world_size,
            "local_rank": self.rank.local_rank,
            "node_rank": self.rank.node_rank,
            "host": socket.gethostname(),
        }

    def _notices(self) -> list[str]:
        """Things the user must know about how this run differed from an untraced one."""
        notices = []
        if self._writer is not None and self._writer.stopped is not None:
            notices.append(self._writer.stopped)
        if self._modules.saw_compiled and self.level == "full":
            notices.append(
                "torch.compile'd modules ran eagerly: the write log (--level full) needs to "
                "see every op. Rerun with --level light to keep compilation (compiled regions "
                "are then untraced, the saved-tensor check still runs)."
            )
        check = self._rank_check
        if check is not None and check.disabled is not None:
            notices.append(f"--check-ranks stopped: the process group refused ({check.disabled}).")
        elif check is not None and check.compared == 0 and self._sharded:
            notices.append(
                "--check-ranks compared nothing: every parameter is a shard (FSDP2, tensor "
                "parallel), different on each rank; the report combines their norms instead."
            )
        elif check is not None and check.compared == 0 and self.step > 0:
            notices.append(
                "--check-ranks compared nothing: no torch.distributed process group was "
                "initialised when the optimizer stepped."
            )
        return notices

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.record_error(exc)
            self.close(status=FAILED, exit_code=None, exception=describe_exception(exc))

    def _end_step(self, step: int) -> None:
        self._forwards_at_step_end = self._modules.forwards
        if step == 0 and self._writer is not None and self._jobs is not None:
            # Now, not only at close: a killed run still says how its steps were counted.
            counted_by = self._steps.counted_by
            self._jobs.submit(functools.partial(self._writer.set_meta, steps_counted_by=counted_by))
        self._flush(finished=True, step=step)
        if self._timeline is not None:
            self._timeline.begin_step(step + 1)

    def _flush(self, *, finished: bool, step: int | None = None, here: bool = False) -> None:
        """Hand the store thread what the step gathered and the values queued before it.

        Everything that reaches SQLite at a step end goes through that thread: the training
        thread never waits for the writer's lock there. `here`: store it on this thread,
        after what the store thread holds.
        """
        writer, jobs = self._writer, self._jobs
        if writer is None or jobs is None:
            return
        step = self.step if step is None else step
        scalars = self._queue_logged()
        gathered = _Gathered(
            step=step,
            finished=finished,
            ready=self._deferred.take(keep_current=finished),
            scalars=scalars,
            checkpointed=self._new_checkpointed(),
            timeline=(
                self._timeline.take(step)
                if self._timeline is not None and self._timeline.recording
                else None
            ),
            counts=tuple(self._writes.take_counts().items()) if self._writes is not None else (),
        )
        if not self._in_owner():
            return  # gathered to forget it: the run is the parent's
        if here:
            jobs.run_here(self._store_step, writer, gathered)
        else:
            jobs.submit(self._store_step, writer, gathered)

    def _in_owner(self) -> bool:
        """False in a process forked while tracing.

        NOTE [fork]: a child forked while tracing (multiprocessing's default on Linux)
        inherits the session and its hooks, but neither the store thread nor the right to
        the database: SQLite connections must not cross a fork, and the run is the
        parent's. The child trains as usual and records nothing.
        """
        return os.getpid() == self._pid

    def _store_step(self, writer: RunWriter, gathered: _Gathered) -> None:
        """On the store thread: read the values, hand them and the step to every sink."""
        for step, values in gathered.scalars:
            self._store_scalars(step, values)
        deliver(gathered.ready)
        if gathered.checkpointed is not None:
            writer.set_meta(checkpointed=gathered.checkpointed)
        if gathered.timeline is not None:
            for sink in self._sinks:
                sink.write_timeline(*gathered.timeline)
        # Last: it ends the step (the writer commits everything the step wrote).
        if gathered.finished or gathered.counts:
            for sink in self._sinks:
                sink.write_step(gathered.step, gathered.counts, finished=gathered.finished)

    def _new_checkpointed(self) -> dict[str, str] | None:
        """Modules activation checkpointing ran, when one appeared (a killed run keeps them)."""
        checkpointed = dict(self._modules.checkpointed)  # one atomic copy: backward adds too
        if len(checkpointed) == self._checkpointed_stored:
            return None
        self._checkpointed_stored = len(checkpointed)
        return checkpointed

    def _queue_logged(self) -> list[tuple[int, dict[str, float]]]:
        """Queue logged tensors to be read late; return the plain numbers, by step."""
        logged, self._logged = self._logged, {}
        plain_by_step = []
        for step, values in logged.items():
            plain = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
            if plain:
                plain_by_step.append((step, plain))
            names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
            if names:
                self._deferred.push(
                    stack_scalars([values[name] for name in names]),
                    functools.partial(_write_named, self._store_scalars, step, names),
                )
        return plain_by_step

    def _store_scalars(self, step: int, values: dict[str, float]) -> None:
        for sink in self._sinks:
            sink.write_scalars(step, values)

    def _store_grad_stats(self, stats: StepGradStats) -> None:
        for sink in self._sinks:
            sink.write_grad_stats(stats)

    def _store_histograms(self, histograms: list[GradHistogram]) -> None:
        for sink in self._sinks:
            sink.write_histograms(histograms)

    def _store_shards(self, shards: dict[str, int]) -> None:
        """Which parameters this rank records as shards, for the merged report to combine."""
        self._sharded = True
        if self._writer is not None:
            self._writer.set_meta(param_shards=shards)

    def _store_rank_norms(self, norms: RankNorms) -> None:
        for sink in self._sinks:
            sink.write_rank_norms(norms)

    def _add_finding(self, finding: Finding) -> None:
        """Any thread. Every sink gets every repeat (the store counts them); `findings`
        keeps one per bug."""
        sinks = self._sinks
        if not sinks or not self._in_owner():
            return
        with self._findings_lock:
            if finding.same_bug not in self._bugs:
                self._bugs.add(finding.same_bug)
                self.findings.append(finding)
        for sink in sinks:
            sink.add_finding(finding)


@dataclass(frozen=True)
class _Gathered:
    """What a step end hands the store thread."""

    step: int
    finished: bool
    # Device values queued before the previous step end, with what to do with them.
    ready: list[Ready]
    # Plain numbers given to `log`, by step.
    scalars: list[tuple[int, dict[str, float]]]
    # Modules checkpointing ran, when one appeared since the last step end.
    checkpointed: dict[str, str] | None
    timeline: tuple[list[Span], list[TracedWrite], dict[int, str]] | None
    counts: tuple[tuple[tuple[str, str, str], int], ...]


def _write_named(
    store: Callable[[int, dict[str, float]], None],
    step: int,
    names: list[str],
    values: list[float],
) -> None:
    store(step, dict(zip(names, values, strict=True)))


def active() -> Session | None:
    """The session tracing right now, if any (hooks are global: there is at most one)."""
    return _active


def describe_exception(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__qualname__, "message": str(exc)}


def _say(message: str) -> None:
    """One line on stderr from gradtrace, apart from the script's own output."""
    sys.stderr.flush()
    print(f"gradtrace: {message}", file=sys.stderr, flush=True)


def _cuda_device_name() -> str | None:
    # Only name a device the script itself initialised: touching CUDA would change its memory.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    return None
