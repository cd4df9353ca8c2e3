"""The Hugging Face Trainer callback with a real Trainer on CPU (models built from configs)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers")

import gradtrace  # noqa: E402
from gradtrace.hf import GradTraceCallback  # noqa: E402


class TinyConfig(transformers.PretrainedConfig):
    model_type = "gradtrace-tiny"

    def __init__(self, inplace_bug: bool = False, **kwargs: object) -> None:
        self.inplace_bug = inplace_bug
        super().__init__(**kwargs)


class TinyGated(transformers.PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=config.inplace_bug)
        self.head = nn.Linear(16, 1)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        gate = torch.sigmoid(self.gate(x))
        hidden = self.proj(x) * self.act(gate)  # BUG LINE when inplace: relu_ on sigmoid's output
        logits = self.head(hidden)
        return {"loss": nn.functional.mse_loss(logits, labels), "logits": logits}


def _marked_line(obj: object, marker: str) -> int:
    lines, first = inspect.getsourcelines(obj)
    return next(first + i for i, line in enumerate(lines) if marker in line)


BUG_LINE = _marked_line(TinyGated, "BUG LINE")


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def bert_data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (32, 12), generator=generator)
    labels = torch.randint(0, 2, (32,), generator=generator)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(32)]


def gated_data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator)
    return [{"x": x[i], "labels": y[i]} for i in range(32)]


def train(
    tmp_path: Path,
    model: nn.Module,
    data: list[dict[str, torch.Tensor]],
    callback: GradTraceCallback | None = None,
) -> nn.Module:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        callbacks=[] if callback is None else [callback],
    )
    trainer.train()
    return model


def test_clean_bert_same_weights_and_no_findings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = train(tmp_path, tiny_bert(), bert_data())
    torch.manual_seed(0)
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    traced = train(tmp_path, tiny_bert(), bert_data(), callback)

    for (name, a), (_, b) in zip(
        plain.state_dict().items(), traced.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    run = gradtrace.load_run(tmp_path / "run")
    assert (run.status, run.meta["front_end"]) == ("ok", "hf")
    assert run.findings == []
    assert callback.findings == []
    assert run.steps == 8  # 2 epochs x 4 batches


def test_inplace_bug_same_exception_and_named_culprit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as plain:
        train(tmp_path, TinyGated(TinyConfig(inplace_bug=True)), gated_data())
    torch.manual_seed(0)
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    with pytest.raises(RuntimeError) as traced, callback:
        train(tmp_path, TinyGated(TinyConfig(inplace_bug=True)), gated_data(), callback)

    assert type(traced.value) is type(plain.value)
    assert str(traced.value).startswith(str(plain.value).split(", which is")[0])
    run = gradtrace.load_run(tmp_path / "run")
    assert run.status == "failed"
    assert run.meta["exception"]["type"] == "RuntimeError"
    [stored] = run.findings
    finding = stored.finding
    assert (finding.file, finding.line) == (__file__, BUG_LINE)
    assert (finding.module, finding.op, finding.phase) == ("act", "relu_", "forward")
    assert finding.saved_by["line"] == BUG_LINE - 1


def test_failed_train_without_with_is_closed_by_close(tmp_path: Path) -> None:
    callback = GradTraceCallback(out=tmp_path / "run", summary=False)
    with pytest.raises(RuntimeError):
        train(tmp_path, TinyGated(TinyConfig(inplace_bug=True)), gated_data(), callback)
    assert callback.trace is not None and callback.trace.active  # no HF hook saw the failure
    callback.close()
    assert gradtrace.load_run(tmp_path / "run").status == "failed"
    callback.close()  # idempotent


def test_bad_level_is_refused() -> None:
    with pytest.raises(gradtrace.GradtraceError, match="Unknown level"):
        GradTraceCallback(level="everything")
