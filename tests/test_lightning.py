"""The Lightning callback with a real Trainer on CPU: same numbers, same errors, named culprit."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (pip install lightning)")

import gradtrace  # noqa: E402
from gradtrace.lightning import GradTraceCallback  # noqa: E402


class Gated(nn.Module):
    def __init__(self, inplace_bug: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=inplace_bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x))
        return self.proj(x) * self.act(gate)  # BUG LINE when inplace: relu_ on sigmoid's output


class TinyModule(pl.LightningModule):
    def __init__(self, inplace_bug: bool = False) -> None:
        super().__init__()
        self.block = Gated(inplace_bug)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.block(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _marked_line(obj: object, marker: str) -> int:
    lines, first = inspect.getsourcelines(obj)
    return next(first + i for i, line in enumerate(lines) if marker in line)


BUG_LINE = _marked_line(Gated, "BUG LINE")


def fit(
    tmp_path: Path,
    *,
    inplace_bug: bool = False,
    callback: GradTraceCallback | None = None,
    detect_anomaly: bool = False,
    logger: object = False,
    checkpoints: bool = False,
) -> TinyModule:
    pl.seed_everything(0, verbose=False)
    module = TinyModule(inplace_bug)
    data = TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        detect_anomaly=detect_anomaly,
        default_root_dir=tmp_path,
        callbacks=[] if callback is None else [callback],
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


def test_clean_module_same_weights_and_no_findings(tmp_path: Path) -> None:
    plain = fit(tmp_path)
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    traced = fit(tmp_path, callback=callback)

    for (name, a), (_, b) in zip(
        plain.state_dict().items(), traced.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    run = gradtrace.load_run(tmp_path / "run")
    assert run.status == "ok"
    assert run.meta["front_end"] == "lightning"
    assert run.findings == []
    assert callback.findings == []
    assert run.steps == 8  # 2 epochs x 4 batches, one optimizer step each
    assert [step for step, _ in run.scalars["loss"]] == list(range(8))


def test_inplace_bug_same_exception_and_named_culprit(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as plain:
        fit(tmp_path, inplace_bug=True)
    callback = GradTraceCallback(out=tmp_path / "run")
    with pytest.raises(RuntimeError) as traced:
        fit(tmp_path, inplace_bug=True, callback=callback)

    assert type(traced.value) is type(plain.value)
    # PyTorch's wording comes first. (Compared up to the node name: torch 2.13 says "output 0
    # of Sigmoid" where gradtrace repeats the node class, "SigmoidBackward0".)
    pytorch_words = str(plain.value).split(", which is")[0]
    assert str(traced.value).startswith(pytorch_words)
    run = gradtrace.load_run(tmp_path / "run")
    assert run.status == "failed"
    assert run.meta["exception"]["type"] == "RuntimeError"
    [stored] = run.findings
    finding = stored.finding
    assert (finding.file, finding.line) == (__file__, BUG_LINE)
    assert finding.op == "relu_"
    assert finding.saved_by["module"] == "block"


# NOTE: Lightning's automatic optimization runs training_step and backward inside a closure
# that `optimizer.step(closure)` calls, i.e. after torch's optimizer step pre-hook. StepProbe
# therefore reports the forward's writes as the optimizer's ("AdamW.step", phase optimizer).
def test_culprit_module_inside_lightning_closure(tmp_path: Path) -> None:
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    with pytest.raises(RuntimeError):
        fit(tmp_path, inplace_bug=True, callback=callback)
    [stored] = gradtrace.load_run(tmp_path / "run").findings
    assert (stored.finding.module, stored.finding.phase) == ("block.act", "forward")


def test_detect_anomaly_still_names_the_culprit(tmp_path: Path) -> None:
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    with pytest.raises(RuntimeError):
        fit(tmp_path, inplace_bug=True, callback=callback, detect_anomaly=True)
    [stored] = gradtrace.load_run(tmp_path / "run").findings
    assert (stored.finding.file, stored.finding.line) == (__file__, BUG_LINE)


def test_clean_module_under_detect_anomaly(tmp_path: Path) -> None:
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    fit(tmp_path, callback=callback, detect_anomaly=True)
    assert gradtrace.load_run(tmp_path / "run").status == "ok"


def test_summary_printed_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = GradTraceCallback(out=tmp_path / "run")
    with pytest.raises(RuntimeError):
        fit(tmp_path, inplace_bug=True, callback=callback)
    err = capsys.readouterr().err
    assert f"test_lightning.py:{BUG_LINE}" in err
    assert str(tmp_path / "run") in err


def test_bad_level_is_refused() -> None:
    with pytest.raises(gradtrace.GradtraceError, match="Unknown level"):
        GradTraceCallback(level="everything")


def test_pytorch_lightning_trainer_accepts_the_callback(tmp_path: Path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")

    class Module(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 1)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    trainer = ptl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    data = TensorDataset(torch.randn(16, 8), torch.randn(16, 1))
    trainer.fit(Module(), DataLoader(data, batch_size=8))
    assert gradtrace.load_run(tmp_path / "run").steps == 2


def test_tensorboard_lands_in_the_loggers_directory(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path / "logs", name="exp")
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    fit(tmp_path, callback=callback, logger=logger)
    runs = list((Path(logger.log_dir) / "gradtrace").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss" in tags
    assert "global/grad_norm" in tags
    assert [e.step for e in events.Scalars("loss")] == list(range(8))


def test_checkpoint_records_the_run_directory(tmp_path: Path) -> None:
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    fit(tmp_path, callback=callback, checkpoints=True)
    [checkpoint] = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["callbacks"]
    [saved] = [v for k, v in state.items() if "GradTraceCallback" in k]
    assert saved == {"run_dir": str(tmp_path / "run")}
