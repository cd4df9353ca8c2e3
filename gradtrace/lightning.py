"""Lightning callback: trace `trainer.fit` into a gradtrace run directory.

Works with `lightning.pytorch` and with `pytorch_lightning`, whichever is installed (the
callback derives from both `Callback` classes when both are, so either `Trainer` accepts it).
Neither is a dependency of gradtrace.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from gradtrace import session
from gradtrace.api import CallbackTrace, Trace
from gradtrace.errors import GradtraceError
from gradtrace.options import DEFAULT_LEVEL


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "gradtrace.lightning needs Lightning, which is not installed. "
            "Install it with: pip install lightning"
        )
    return tuple(bases)


class GradTraceCallback(CallbackTrace, *_callback_bases()):  # type: ignore[misc]
    """Trace training: the run starts at `on_train_start` and ends with the fit.

    `out` is the run directory (default `./gradtrace-runs/<time>-<LightningModule class>`),
    `level` as for `gradtrace.trace`. Only global rank zero traces and prints. When the fit
    fails, the run is closed as failed with the exception, and the exception (re-raised by
    Lightning unchanged) gets the culprit finding as a note. With `summary=True` the terminal
    summary is printed to stderr when the run ends.

    `tensorboard=None` (the default) writes TensorBoard events next to the user's own curves
    when the trainer has a TensorBoardLogger: into its log dir, under a `gradtrace` sub-run.
    True writes them into the run directory, a path into that logdir, False nowhere.
    """

    def __init__(
        self,
        out: str | Path | None = None,
        *,
        level: str = DEFAULT_LEVEL,
        summary: bool = True,
        tensorboard: bool | str | Path | None = None,
    ) -> None:
        super().__init__()
        self._set_options(out, level, summary)
        self.tensorboard = tensorboard
        # The run directory a resumed checkpoint was recorded in, if any.
        self.resumed_from: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Fail before any training work (sanity checks included) when tracing cannot start.
        active = session.active()
        if stage == "fit" and trainer.is_global_zero and active is not None:
            raise GradtraceError(
                f"A gradtrace session is already tracing into '{active.run_dir}'; "
                "stop it before fitting with GradTraceCallback."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        self._begin(
            Trace(
                pl_module,
                out=self.out,
                level=self.level,
                front_end="lightning",
                tensorboard=self._tensorboard_target(trainer),
            )
        )

    def _tensorboard_target(self, trainer: Any) -> bool | str | Path:
        if self.tensorboard is not None:
            return self.tensorboard
        for logger in getattr(trainer, "loggers", ()):
            if type(logger).__name__ == "TensorBoardLogger":
                return logger.log_dir
        return False

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where the run that wrote them was recorded."""
        return {"run_dir": None if self.run_dir is None else str(self.run_dir)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_from = state_dict.get("run_dir")

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.trace is not None and self.trace.active:
            self.trace.log(loss=loss.detach())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish()  # no-op unless the run is still open

    def _finish(self, exception: BaseException | None = None) -> None:
        trace = self.trace
        if trace is None or not trace.active:
            return
        trace.stop(exception=exception)


__all__ = ["GradTraceCallback"]
