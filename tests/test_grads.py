"""Gradient health on tiny seeded models: each pathology is named, a clean model is not."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrace.probes import deferred
from gradtrace.probes.grads import ZERO_COUNT_EVERY
from gradtrace.session import Session
from gradtrace.store import load_run


class Net(nn.Module):
    """Two blocks and a head; `cut` chooses how the graph to `first` is broken, if at all."""

    def __init__(self, cut: str = "") -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.act = nn.ReLU()
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.cut == "detach":
            h = h.detach()
        elif self.cut == "data":
            h = h.data
        elif self.cut == "rewrap":
            h = torch.tensor(h.tolist())
        return self.head(self.act(self.second(h)))


class LogHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(h).abs() * 0)  # log(0) = -inf on every sample


def train(
    model: nn.Module,
    steps: int,
    lr: float = 0.05,
    *,
    session: Session | None = None,
    clip: float | None = None,
):
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if session is not None:
            session.log(loss=loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def traced(tmp_path: Path, model: nn.Module, steps: int = 4, **options) -> Session:
    lr = options.pop("lr", 0.05)
    clip = options.pop("clip", None)
    with Session(tmp_path / "run", **options) as session:
        train(model, steps, lr, session=session, clip=clip)
    return session


def kinds(session: Session) -> list[str]:
    return [f.kind for f in session.findings]


def test_norms_match_vector_norm_per_parameter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    initial = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    with Session(tmp_path / "run"):
        train(model, 3)
        expected = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}
    first, *_, last = load_run(tmp_path / "run").grad_steps
    assert {p.name for p in last.params} == set(expected)
    for stat in last.params:
        assert stat.grad_norm == pytest.approx(expected[stat.name], rel=1e-6)
        assert stat.module == stat.name.rsplit(".", 1)[0]
    # Parameter norms come on sampled steps (step 0 is one), taken before the update.
    for stat in first.params:
        assert stat.param_norm == pytest.approx(initial[stat.name], rel=1e-6)
    assert all(math.isnan(stat.param_norm) for stat in last.params)
    assert sorted(stat.arrival for stat in last.params) == list(range(6))
    head = {stat.name: stat.arrival for stat in last.params}
    assert head["head.weight"] < head["first.weight"]  # backward order: head first


def test_clean_model_has_no_findings_and_logs_scalars(tmp_path: Path) -> None:
    torch.manual_seed(0)
    session = traced(tmp_path, Net(), steps=6)
    assert session.findings == []
    run = load_run(tmp_path / "run")
    assert [step for step, _ in run.scalars["loss"]] == list(range(6))


def test_log_of_zero_is_traced_to_its_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), LogHead())
    session = traced(tmp_path, model, steps=2)
    [finding] = [f for f in session.findings if f.kind == "non-finite"]
    assert finding.step == 0
    assert finding.module == "2"  # LogHead: its Linear child is finite, its output is not
    assert finding.details["nonfinite_outputs"][0] == "2"
    assert finding.file == __file__
    assert finding.function == "LogHead.forward"


class Activated(nn.Module):
    """Linear, then an activation of its output: as-is, in place, scaled, after a write, or
    in place after an in-place residual add that overflows."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.act = nn.ReLU(inplace=True) if "inplace" in how else nn.Tanh()
        self.out = nn.Linear(8, 1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "scaled":
            h = h * 2
        elif self.how == "written":
            h[0, 0] = math.inf
        elif self.how == "inplace-residual":
            h += 1e39  # float32 overflow: Inf
        return self.out(self.act(h))


@pytest.mark.parametrize(
    ("how", "act_summed"),
    [
        ("as-is", False),
        ("inplace", False),
        ("scaled", True),
        ("written", True),
        ("inplace-residual", True),
    ],
)
def test_a_bounded_activation_of_a_summed_output_is_not_summed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, act_summed: bool
) -> None:
    from gradtrace.probes import grads

    summed: list[str] = []
    add = grads.OutputSums.add

    def spy(sums: grads.OutputSums, name: str, tensor: torch.Tensor) -> None:
        if sums.reduce is grads.sum_into:  # output sums, not gradient norms or dead units
            summed.append(name)
        add(sums, name, tensor)

    monkeypatch.setattr(grads.OutputSums, "add", spy)
    torch.manual_seed(0)
    traced(tmp_path, Activated(how), steps=1)
    assert ("act" in summed) == act_summed, summed
    assert {"lin", "out"} <= set(summed)


def test_an_in_place_residual_overflow_is_found_at_the_activation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    session = traced(tmp_path, Activated("inplace-residual"), steps=1)
    [finding] = [f for f in session.findings if f.kind == "non-finite"]
    assert finding.module == "act"  # `lin` was finite; `h += 1e39` then `relu_` are not
    assert finding.details["nonfinite_outputs"][0] == "act"


def test_exploding_learning_rate_names_the_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    with Session(tmp_path / "run") as session:
        train(model, 12, lr=0.01)
        with torch.no_grad():
            model.head.weight.mul_(1e4)  # the layer blows up at the next step
        train(model, 1, lr=0.0)
    [finding] = [f for f in session.findings if f.kind == "exploding"]
    assert finding.step == 12
    assert finding.module in {"first", "second"}
    assert finding.details["grad_norm"] > 10 * finding.details["median"]


@pytest.mark.parametrize("cut", ["detach", "data", "rewrap"])
def test_cut_graph_names_the_starved_parameters(tmp_path: Path, cut: str) -> None:
    torch.manual_seed(0)
    session = traced(tmp_path, Net(cut=cut), steps=3)
    [finding] = [f for f in session.findings if f.kind == "no-grad"]
    assert finding.module == "first"
    assert finding.details["parameters"] == ["first.weight", "first.bias"]
    assert finding.file == __file__
    assert finding.function == "Net.forward"


def test_every_n_steps_and_one_read_per_recorded_step(tmp_path: Path, monkeypatch) -> None:
    """With every statistic on: update ratio, clipping (and dead units on sampled steps)."""
    reads = []
    original = deferred.DeferredValues.read

    def counting_read(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(deferred.DeferredValues, "read", counting_read)
    torch.manual_seed(0)
    traced(tmp_path, Net(), steps=9, every=3, update_ratio=True, clip=1.0)
    run = load_run(tmp_path / "run")
    assert [s.step for s in run.grad_steps] == [0, 3, 6]
    assert all(len(s.clips) == 1 for s in run.grad_steps)
    assert all(math.isfinite(p.update_norm) for s in run.grad_steps for p in s.params)
    assert [s.dead_units[0][0] for s in run.grad_steps if s.dead_units] == ["act"]  # step 0
    # One batched read per recorded step, plus one per step for the logged loss.
    assert len(reads) == 3 + 9


def test_a_logged_loss_does_not_make_its_step_read_early(tmp_path: Path, monkeypatch) -> None:
    """Step N's statistics are handed over to be read when step N+1 ends, even with a tensor
    logged at step N."""
    taken_at: list[tuple[int, int]] = []
    original = deferred.DeferredQueue.take
    session = Session(tmp_path / "run")

    def noting_take(self, *, keep_current: bool = False):
        ready = original(self, keep_current=keep_current)
        taken_at.append((session.step, len(ready)))
        return ready

    monkeypatch.setattr(deferred.DeferredQueue, "take", noting_take)
    torch.manual_seed(0)
    with session:
        train(Net(), 3, session=session)
        # Steps 0 and 1 (grad stats and loss each) were taken as steps 1 and 2 ended.
        assert taken_at == [(0, 0), (1, 2), (2, 2)]


def test_grad_scaler_skips_are_normal_until_they_persist(tmp_path: Path) -> None:
    def run(name: str, bad_iterations: set[int]) -> Session:
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu")
        with Session(tmp_path / name) as session:
            for i in range(14):
                loss = model(torch.randn(8, 4)).square().mean()
                if i in bad_iterations:
                    loss = loss * math.inf
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        return session

    occasional = run("occasional", {3})
    assert occasional.findings == []
    scale = load_run(tmp_path / "occasional").scalars["amp/scale"]
    assert scale[0][1] == 65536.0 and scale[-1][1] == 32768.0
    persistent = run("persistent", set(range(2, 14)))
    [finding] = persistent.findings
    assert finding.kind == "non-finite"
    assert finding.details["longest_run"] == 12


def test_closure_optimizer_stats_come_after_the_closure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=3)
    x = torch.randn(16, 4)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with Session(tmp_path / "run") as session:
        for _ in range(2):
            optimizer.step(closure)
    assert session.findings == []
    run = load_run(tmp_path / "run")
    assert [s.step for s in run.grad_steps] == [0, 1]
    assert all(s.missing == () and len(s.params) == 6 for s in run.grad_steps)
    # The closure's forward/backward belong to the model, not to the optimizer phase.
    assert not any(
        owner == "LBFGS.step" and phase != "optimizer" for owner, _, phase, _ in run.write_counts
    )


def test_loss_logged_after_the_step_belongs_to_that_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Session(tmp_path / "run") as session:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.log(loss=loss, lr=0.05)
    scalars = load_run(tmp_path / "run").scalars
    assert [step for step, _ in scalars["loss"]] == [0, 1, 2]
    assert [step for step, _ in scalars["lr"]] == [0, 1, 2]


def test_vanishing_is_relative_to_the_rest_of_the_model() -> None:
    from gradtrace.analysis.grad_health import diagnose_gradients
    from gradtrace.events import ParamStat, StepGradStats

    def step(i: int, early: float, late: float) -> StepGradStats:
        # Parameter norms are taken on sampled steps only (here step 0): the last one stands.
        weight = 1.0 if i == 0 else math.nan
        params = (
            ParamStat("early.weight", "early", 10, early, weight, 0.0, 1),
            ParamStat("mid.weight", "mid", 10, late, weight, 0.0, 0),
            ParamStat("late.weight", "late", 10, late, weight, 0.0, 0),
        )
        return StepGradStats(i, "SGD.step", params, (), (), (), ())

    starved = [step(i, 1e-12, 1e-2) for i in range(4)]
    [finding] = diagnose_gradients(starved, {})
    assert (finding.kind, finding.module) == ("vanishing", "early")
    assert "all 4 recorded steps" in finding.message
    converged = [step(i, 1e-12, 1e-11) for i in range(4)]  # loss ~ 0 everywhere: not vanishing
    assert diagnose_gradients(converged, {}) == []


def test_gradtraces_own_ops_are_not_counted_as_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Session(tmp_path / "run", level="full") as session:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).square().mean()
            optimizer.zero_grad()
            loss.backward(retain_graph=True)  # saved tensors stay live: the step is logged
            session.log(loss=loss)
            optimizer.step()
    counts = {
        (owner, op, phase): n for owner, op, phase, n in load_run(tmp_path / "run").write_counts
    }
    assert counts == {("SGD.step", "add_", "optimizer"): 3 * 6}


def test_exactly_zero_gradients_are_not_called_a_cut() -> None:
    from gradtrace.analysis.grad_health import diagnose_gradients
    from gradtrace.events import ParamStat, StepGradStats

    def step(i: int) -> StepGradStats:
        params = (
            ParamStat("critic.weight", "critic", 8, 0.5, 1.0, 0.0, 0),
            ParamStat("critic.bias", "critic", 1, 0.0, 1.0, 1.0, 1),  # cancels every step
        )
        return StepGradStats(i, "SGD.step", params, (("stem.weight", "stem"),), (), (), ())

    cut, zero = diagnose_gradients([step(i) for i in range(3)], {})
    assert (cut.kind, cut.parameter, cut.details["grad"]) == ("no-grad", "stem.weight", None)
    assert (zero.kind, zero.parameter, zero.details["grad"]) == ("no-grad", "critic.bias", "zero")
    assert "exactly-zero" in zero.message and "never got a gradient" in cut.message


def test_gradient_at_parameter_free_module_outputs_on_sampled_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    with Session(tmp_path / "run", model=model):
        for step in range(ZERO_COUNT_EVERY + 1):
            seen = grads.setdefault(step, {})
            hidden = model[0](torch.randn(16, 4))
            act = model[1](hidden)
            act.register_hook(lambda g, seen=seen: seen.__setitem__("1", g))
            dropped = model[2](act)
            dropped.register_hook(lambda g, seen=seen: seen.__setitem__("2", g))
            loss = model[3](dropped).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    recorded = {s.step: dict(s.output_grad_norms) for s in load_run(tmp_path / "run").grad_steps}
    assert [step for step, norms in recorded.items() if norms] == [0, ZERO_COUNT_EVERY]
    for step in (0, ZERO_COUNT_EVERY):
        assert set(recorded[step]) == {"1", "2"}  # Tanh and Dropout: the parameter-free modules
        for name, grad in grads[step].items():
            expected = torch.linalg.vector_norm(grad).item()
            assert recorded[step][name] == pytest.approx(expected, rel=1e-6)


class Overflow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + math.inf


class Everything(nn.Module):
    """Every statistic has something to record: a ReLU with dead units, a parameter-free
    module, an output that is Inf, and a layer that is never called. The test calls the
    modules one by one, to hook what reaches each output."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.keep = nn.Identity()
        self.head = nn.Linear(8, 2)
        self.overflow = Overflow()
        self.unused = nn.Linear(2, 2)
        with torch.no_grad():
            self.hidden.bias[:3] = -100.0  # three units dead on every sample


def test_each_statistic_of_a_step_reads_its_own_numbers(tmp_path: Path) -> None:
    """One sampled step with every statistic on, clipped by a float and a tensor max_norm:
    each recorded number is the one torch computes for that statistic."""
    torch.manual_seed(0)
    model = Everything()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: dict[str, torch.Tensor] = {}
    with Session(tmp_path / "run", model=model, update_ratio=True, level="light"):
        x = torch.randn(16, 4)
        act = model.act(model.hidden(x))
        kept = model.keep(act)
        act.register_hook(lambda g: seen.__setitem__("act", g))
        kept.register_hook(lambda g: seen.__setitem__("keep", g))
        model.overflow(kept)  # off the loss's graph: Inf, and no gradient reaches it
        model.head(kept).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        torch.nn.utils.clip_grad_norm_(model.parameters(), torch.tensor(2e9))
        optimizer.step()
    [stats] = load_run(tmp_path / "run").grad_steps
    assert [p.name for p in stats.params] == list(grads)
    for stat in stats.params:
        after = dict(model.named_parameters())[stat.name].detach()
        expected = (
            torch.linalg.vector_norm(grads[stat.name]).item(),
            torch.linalg.vector_norm(before[stat.name]).item(),
            (grads[stat.name] == 0).double().mean().item(),
            torch.linalg.vector_norm(after - before[stat.name]).item(),
            grads[stat.name].numel(),
        )
        recorded = (
            stat.grad_norm,
            stat.param_norm,
            stat.zero_fraction,
            stat.update_norm,
            stat.numel,
        )
        assert recorded == pytest.approx(expected, rel=1e-5), stat.name
    assert stats.missing == (("unused.weight", "unused"), ("unused.bias", "unused"))
    assert [c.max_norm for c in stats.clips] == [1e9, 2e9]
    assert [c.norm_before for c in stats.clips] == pytest.approx([total.item()] * 2, rel=1e-6)
    assert stats.dead_units == (("act", 3, 8),)
    assert dict(stats.output_grad_norms) == pytest.approx(
        {name: torch.linalg.vector_norm(grad).item() for name, grad in seen.items()}, rel=1e-6
    )
    assert stats.nonfinite_outputs == ("overflow",)


def updated_stepwise(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int):
    """Train, computing each step's ‖Δp‖/‖p‖ per parameter independently of gradtrace."""
    torch.manual_seed(1)
    ratios: dict[int, dict[str, float]] = {}
    for step in range(steps):
        loss = model(torch.randn(16, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        ratios[step] = {
            name: (
                torch.linalg.vector_norm(p.detach() - before[name])
                / torch.linalg.vector_norm(before[name])
            ).item()
            for name, p in model.named_parameters()
        }
    return ratios


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_update_ratio_is_the_relative_change_of_each_parameter(
    tmp_path: Path, optimizer_class: type[torch.optim.Optimizer]
) -> None:
    from gradtrace.analysis.grad_health import module_norms, update_ratio

    torch.manual_seed(0)
    model = Net()
    optimizer = optimizer_class(model.parameters(), lr=0.05)
    with Session(tmp_path / "run", update_ratio=True, every=2):
        expected = updated_stepwise(model, optimizer, 5)
    run = load_run(tmp_path / "run")
    assert [s.step for s in run.grad_steps] == [0, 2, 4]
    for stats in run.grad_steps:
        assert {p.name for p in stats.params} == set(expected[stats.step])
        for stat in stats.params:
            assert update_ratio(stat) == pytest.approx(expected[stats.step][stat.name], rel=1e-5)
        # Per module: the module's parameters taken together.
        weight, bias = (p for p in stats.params if p.module == "head")
        together = math.hypot(weight.update_norm, bias.update_norm) / math.hypot(
            weight.param_norm, bias.param_norm
        )
        head = dict(module_norms([stats]).update_ratio["head"])
        assert head[stats.step] == pytest.approx(together, rel=1e-9)


def test_update_ratio_is_opt_in_and_its_copy_is_freed_at_the_step(
    tmp_path: Path, monkeypatch
) -> None:
    import gc
    import weakref

    from gradtrace.probes import _torch_compat

    copies: list[weakref.ref[torch.Tensor]] = []
    original = _torch_compat.foreach_copy

    def watched_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        made = original(tensors)
        copies.extend(weakref.ref(t) for t in made)
        return made

    monkeypatch.setattr(_torch_compat, "foreach_copy", watched_copy)
    torch.manual_seed(0)
    traced(tmp_path / "off", Net(), steps=2)
    assert copies == []
    off = load_run(tmp_path / "off" / "run")
    assert all(math.isnan(p.update_norm) for s in off.grad_steps for p in s.params)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Session(tmp_path / "on", update_ratio=True):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        optimizer.step()
        gc.collect()
        assert len(copies) == 6 and all(copy() is None for copy in copies)


def test_clipping_records_the_norm_before_and_after(tmp_path: Path) -> None:
    from torch.nn.utils import clip_grad

    from gradtrace.analysis.grad_health import clipping

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    returned, after = [], []
    with Session(tmp_path / "run"):
        from torch.nn.utils import clip_grad_norm_  # imported while tracing: the wrapper

        for step in range(4):
            loss = model(torch.randn(16, 4)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            clip = (torch.nn.utils.clip_grad_norm_, clip_grad.clip_grad_norm_, clip_grad_norm_)
            returned.append(clip[step % 3](model.parameters(), max_norm=0.1).item())
            grads = [p.grad for p in model.parameters()]
            after.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            optimizer.step()
    steps = clipping(load_run(tmp_path / "run").grad_steps)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert [s.norm_before for s in steps] == pytest.approx(returned, rel=1e-6)
    assert [s.norm_after for s in steps] == pytest.approx(after, rel=1e-5)
    assert all(s.max_norm == 0.1 and s.clipped for s in steps)
    assert all(s.norm_after == pytest.approx(0.1, rel=1e-4) for s in steps)


def test_new_options_leave_training_bitwise_unchanged(tmp_path: Path) -> None:
    def fit(session: Session | None) -> tuple[list[torch.Tensor], nn.Module, dict]:
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        losses = []
        for _ in range(4):
            loss = model(torch.randn(16, 4)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            losses.append(loss.detach())
        return losses, model, optimizer.state_dict()

    plain_losses, plain_model, plain_state = fit(None)
    with Session(tmp_path / "run", update_ratio=True, every=2) as session:
        traced_losses, traced_model, traced_state = fit(session)
    assert torch.equal(torch.stack(plain_losses), torch.stack(traced_losses))
    for a, b in zip(plain_model.parameters(), traced_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for key, state in plain_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, traced_state["state"][key][name]), name


class Dying(nn.Module):
    """A hidden layer whose ReLU units are dead when their bias is very negative."""

    def __init__(self, dead: int, *, inplace: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 16)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.hidden.bias[:dead] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.hidden(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_dead_relu_units_are_named(tmp_path: Path, inplace: bool) -> None:
    torch.manual_seed(0)
    plain = train(Dying(12, inplace=inplace), 11)
    torch.manual_seed(0)
    model = Dying(12, inplace=inplace)
    with Session(tmp_path / "run") as session:
        traced_losses = train(model, 11)
    assert traced_losses == plain  # ReLU(inplace=True) is only read
    [finding] = [f for f in session.findings if f.kind == "dead-units"]
    assert (finding.module, finding.step) == ("act", 10)
    assert finding.details["dead_fraction"] == 0.75 and finding.details["units"] == 16
    assert finding.file == __file__  # the line that calls self.act
    samples = [s.dead_units for s in load_run(tmp_path / "run").grad_steps if s.dead_units]
    assert samples == [(("act", 12, 16),), (("act", 12, 16),)]  # steps 0 and 10


def test_no_dead_units_on_a_healthy_model_and_units_along_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    session = traced(tmp_path, Dying(0), steps=11)
    assert session.findings == []
    torch.manual_seed(0)
    sequence = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    optimizer = torch.optim.SGD(sequence.parameters(), lr=0.1)
    with Session(tmp_path / "seq", model=sequence):
        x = torch.randn(2, 5, 4)  # (batch, sequence, features): units are the features
        with torch.no_grad():
            sequence[0].bias[:2] = -100.0
        sequence(x).sum().backward()
        optimizer.step()
    [stats] = load_run(tmp_path / "seq").grad_steps
    assert stats.dead_units == (("1", 2, 6),)


def test_dead_units_must_stay_dead_in_every_sample() -> None:
    from gradtrace.analysis.grad_health import diagnose_gradients
    from gradtrace.events import ParamStat, StepGradStats

    def step(i: int, dead: tuple[tuple[str, int, int], ...]) -> StepGradStats:
        params = (ParamStat("fc.weight", "fc", 8, 0.5, 1.0, 0.0, 0),)
        return StepGradStats(i, "SGD.step", params, (), (), (), (), dead_units=dead)

    def kinds_of(samples: list[tuple[tuple[str, int, int], ...]]) -> list[str]:
        steps = [step(10 * i, dead) for i, dead in enumerate(samples)]
        return [f.kind for f in diagnose_gradients(steps, {})]

    assert kinds_of([(("a", 5, 8),), (("a", 4, 8),)]) == ["dead-units"]
    assert kinds_of([(("a", 5, 8),), (("a", 3, 8),)]) == []  # revived: below half once
    assert kinds_of([(("a", 8, 8),)]) == []  # one sample is not enough


def test_two_optimizers_in_one_step_make_one_global_norm_point() -> None:
    from gradtrace.analysis.grad_health import module_norms
    from gradtrace.events import ParamStat, StepGradStats

    def record(step: int, optimizer: str, module: str, norm: float) -> StepGradStats:
        param = ParamStat(f"{module}.weight", module, 4, norm, 1.0, 0.0, 0)
        return StepGradStats(step, optimizer, (param,), (), (), (), ())

    records = [record(0, "SGD.step", "encoder", 3.0), record(0, "Adam.step", "head", 4.0)]
    norms = module_norms(records)
    assert norms.global_grad == [(0, 5.0)]  # what clip_grad_norm_ over both would see
    assert norms.grad == {"encoder": [(0, 3.0)], "head": [(0, 4.0)]}


def test_running_median_is_statistics_median_of_every_prefix() -> None:
    import random
    import statistics

    from gradtrace.analysis.grad_health import RunningMedian

    rng = random.Random(0)
    values = [rng.choice([rng.gauss(0, 1), rng.randint(-3, 3), 1e-30, 5e30]) for _ in range(500)]
    running = RunningMedian()
    for i, value in enumerate(values, start=1):
        running.add(value)
        assert len(running) == i
        assert running.median() == statistics.median(values[:i])


def test_exploding_needs_ten_finite_values_before_the_jump() -> None:
    from gradtrace.analysis.grad_health import diagnose_gradients
    from gradtrace.events import ParamStat, StepGradStats

    nan, inf = math.nan, math.inf
    norms = [1.0, 1.0, nan, 1.0, 1.0, 1.0, inf, 1.0, 1.0, 1.0, 50.0, 1.0, 20.0]

    def step(i: int) -> StepGradStats:
        # A non-finite norm is its own finding; only "exploding" matters here.
        param = ParamStat("fc.weight", "fc", 8, norms[i], 1.0, 0.0, 0)
        return StepGradStats(i, "SGD.step", (param,), (), (), (), ())

    exploding = [
        f for f in diagnose_gradients([step(i) for i in range(13)], {}) if f.kind == "exploding"
    ]
    # Step 10 (50.0) has 8 finite values before it: too few to judge. Step 12 has ten, with
    # 50.0 among them, and their median is still 1.0.
    [finding] = exploding
    assert (finding.step, finding.details["median"], finding.details["grad_norm"]) == (
        12,
        1.0,
        20.0,
    )


def test_a_batch_of_one_is_no_evidence_of_dead_units(tmp_path: Path) -> None:
    """A policy called on one observation at a time, as REINFORCE does: most of its ReLU
    units are zero for that one sample, though none is dead over many."""
    torch.manual_seed(0)
    model = Dying(0)
    with torch.no_grad():
        model.hidden.bias[:] = -0.5  # more than half of the units are zero for one sample
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Session(tmp_path / "run") as session:
        for _ in range(11):
            loss = sum(model(torch.randn(1, 4)).square().sum() for _ in range(8))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert [f.kind for f in session.findings] == []
    assert all(not s.dead_units for s in load_run(tmp_path / "run").grad_steps)
