"""torchrun jobs: DDP on gloo (CPU), 2 real processes per job, through the real launcher.

`gradtrace run --nproc-per-node 2` (torch.distributed.run inside), and torchrun itself
starting `gradtrace run` in each rank. Each job runs in its own session and process group so
a timeout kills every process it started.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradtrace
from gradtrace.analysis.cross_rank import RANK_DIVERGENCE, diagnose_ranks
from gradtrace.analysis.report import build_report
from gradtrace.errors import GradtraceError
from gradtrace.events import ParamStat, RankNorms, StepGradStats
from gradtrace.probes._torch_compat import unwrapped_path
from gradtrace.ranks import agree_on_job_dir, current_rank
from gradtrace.reporters.runs_table import find_runs
from gradtrace.store.reader import load_job, load_run
from gradtrace.store.shards import combine_shards

SCRIPTS = Path(__file__).resolve().parent / "distributed"
# Generous: a job starts 2-4 processes on a box whose cores other work shares.
TIMEOUT_S = 300
PARAMS = {
    "encoder.0.weight",
    "encoder.0.bias",
    "encoder.2.weight",
    "encoder.2.bias",
    "gate.weight",
    "gate.bias",
    "head.weight",
    "head.bias",
}

needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)


def _start(argv: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        # A wide console: the summary's lines must not wrap inside the phrases tests look for.
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _job(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return _finish(_start(argv, cwd, **env))


def _finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a launcher; on timeout kill its process group, so no rank outlives a test."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args} ran past {TIMEOUT_S} s\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _gradtrace_argv(script: str, job_dir: Path, *options: str) -> list[str]:
    argv = [sys.executable, "-m", "gradtrace", "run", "--out", str(job_dir)]
    return [*argv, "--nproc-per-node", "2", *options, str(SCRIPTS / script)]


def _gradtrace_job(script: str, job_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return _job(_gradtrace_argv(script, job_dir, *options), SCRIPTS)


def _torchrun_argv(*args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", "2", *args]


def _report(*job_dirs: Path) -> dict:
    printed = subprocess.run(
        [sys.executable, "-m", "gradtrace", "report", "--json", *map(str, job_dirs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(printed.stdout)


@needs_gloo
@pytest.mark.parametrize("bucket_view", ["0", "1"], ids=["grads", "grads-as-bucket-views"])
def test_clean_ddp_job_has_no_findings_and_trains_bit_for_bit(
    tmp_path: Path, bucket_view: str
) -> None:
    job = tmp_path / "job"
    plain = _start(
        _torchrun_argv(str(SCRIPTS / "ddp_clean.py")),
        SCRIPTS,
        DDP_WEIGHTS_OUT=str(tmp_path / "plain"),
        DDP_BUCKET_VIEW=bucket_view,
    )
    traced = _start(
        _gradtrace_argv("ddp_clean.py", job),
        SCRIPTS,
        DDP_WEIGHTS_OUT=str(tmp_path / "traced"),
        DDP_BUCKET_VIEW=bucket_view,
    )
    plain, traced = _finish(plain), _finish(traced)
    assert plain.returncode == 0, plain.stderr
    assert traced.returncode == 0, traced.stderr
    assert re.findall(r"step \d loss [\d.]+", traced.stdout) == re.findall(
        r"step \d loss [\d.]+", plain.stdout
    )
    for rank in (0, 1):
        expected = torch.load(tmp_path / f"plain.rank{rank}.pt")
        got = torch.load(tmp_path / f"traced.rank{rank}.pt")
        assert all(torch.equal(expected[name], got[name]) for name in expected)

    report = _report(job)
    assert report["findings"] == []
    assert report["run"]["status"] == "ok"
    assert report["run"]["world_size"] == 2
    assert [(r["rank"], r["status"], r["steps"]) for r in report["ranks"]] == [
        (0, "ok", 6),
        (1, "ok", 6),
    ]
    # Names as in the user's model: DistributedDataParallel's `module.` prefix is seen through.
    assert set(report["grad_stats"]["params"]) == PARAMS
    # The merged summary is printed once, by the launcher: ranks stay quiet.
    assert traced.stderr.count("2 ranks") == 1
    assert "0 findings" in traced.stderr


@needs_gloo
def test_inplace_bug_fails_as_without_gradtrace_and_names_line_module_ranks(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job"
    traced = _gradtrace_job("ddp_inplace.py", job)
    assert traced.returncode == 1
    # Each rank's own traceback ends with PyTorch's error, as without gradtrace.
    raised = re.findall(r"^RuntimeError: one of the variables needed", traced.stderr, re.M)
    assert len(raised) == 2

    report = _report(job)
    assert report["run"]["status"] == "failed"
    assert report["run"]["exit_code"] == 1
    assert [r["status"] for r in report["ranks"]] == ["failed", "failed"]
    assert sum(r["failed_first"] for r in report["ranks"]) == 1
    source = (SCRIPTS / "ddp_inplace.py").read_text().splitlines()
    culprit = next(n for n, text in enumerate(source, 1) if "# expect:" in text)
    findings = [f for f in report["findings"] if f["kind"] == "inplace-write"]
    assert sorted(f["rank"] for f in findings) == [0, 1]
    for finding in findings:
        assert (finding["file"], finding["line"]) == (str(SCRIPTS / "ddp_inplace.py"), culprit)
        assert (finding["op"], finding["module"]) == ("mul_", "Buggy")
    # One panel for the same bug on both ranks.
    assert "in-place write broke backward · ranks 0, 1" in traced.stderr
    html = tmp_path / "report.html"
    subprocess.run(
        [sys.executable, "-m", "gradtrace", "report", str(job), "--html", str(html)],
        check=True,
        timeout=120,
    )
    assert "<h2>Ranks</h2>" in html.read_text() and "failed first" in html.read_text()
    # `ls` counts a job's findings from its ranks' counts at close, without its series.
    (entry,) = find_runs(tmp_path)
    assert (entry.facts.status, entry.findings) == ("failed", len(report["findings"]))
    (first,) = [r["rank"] for r in report["ranks"] if r["failed_first"]]
    assert entry.facts.meta["first_failed_rank"] == first


@needs_gloo
def test_check_ranks_names_the_parameter_and_step_where_a_rank_diverged(tmp_path: Path) -> None:
    job = _gradtrace_job("ddp_diverge.py", tmp_path / "job", "--check-ranks")
    assert job.returncode == 0, job.stderr
    findings = _report(tmp_path / "job")["findings"]
    assert [(f["kind"], f["parameter"], f["step"], f["rank"]) for f in findings] == [
        (RANK_DIVERGENCE, "head.weight", 2, 1)
    ]
    assert findings[0]["details"]["quantity"] == "gradient"
    assert findings[0]["module"] == "head"


@needs_gloo
def test_ranks_under_torchrun_agree_on_one_run_directory(tmp_path: Path) -> None:
    job = _job(_torchrun_argv("-m", "gradtrace", "run", str(SCRIPTS / "ddp_clean.py")), tmp_path)
    assert job.returncode == 0, job.stderr
    (job_dir,) = (tmp_path / "gradtrace-runs").iterdir()
    assert sorted(p.name for p in job_dir.iterdir()) == ["rank-0", "rank-1"]
    assert [run.rank for run in load_run(job_dir).ranks] == [0, 1]
    # Rank 0 prints its summary and where the merged one is; rank 1 has nothing to say.
    assert job.stderr.count("run directory:") == 1
    assert "All ranks: gradtrace report" in job.stderr


def _norms(step: int, grads: list[list[float]], params: list[list[float]]) -> RankNorms:
    names = tuple(f"layer{i}.weight" for i in range(len(grads[0])))
    return RankNorms(step, "SGD.step", names, tuple(map(tuple, grads)), tuple(map(tuple, params)))


def test_equal_norms_on_every_rank_are_no_finding() -> None:
    nan = float("nan")
    same = _norms(0, [[1.0, nan], [1.0, nan], [1.0, nan]], [[2.0, 3.0]] * 3)
    assert diagnose_ranks([same], {}) == []


def test_the_rank_off_the_majority_is_named_at_the_first_diverging_step() -> None:
    steps = [
        _norms(0, [[1.0, 5.0]] * 3, [[2.0, 3.0]] * 3),
        _norms(1, [[1.0, 5.0]] * 3, [[2.0, 3.0], [2.0, 3.0], [2.0, 3.5]]),
        _norms(2, [[1.0, 5.0], [1.0, 9.0], [1.0, 5.0]], [[2.0, 3.0]] * 3),
    ]
    (finding,) = diagnose_ranks(steps, {})
    assert (finding.step, finding.parameter, finding.rank) == (1, "layer1.weight", 2)
    assert finding.details["quantity"] == "value"
    assert finding.details["norms"] == [3.0, 3.0, 3.5]


def test_a_rank_without_a_gradient_is_said_so() -> None:
    # -1: the rank had no gradient for the parameter, so neither norm was taken.
    (finding,) = diagnose_ranks([_norms(0, [[1.0], [-1.0]], [[2.0], [-1.0]])], {})
    assert (finding.parameter, finding.rank, finding.details["quantity"]) == (
        "layer0.weight",
        1,
        "gradient",
    )
    assert "rank 1 no gradient" in finding.message
    assert "computed no gradient" in finding.message


def test_a_missing_gradient_on_the_rank_not_blamed_is_still_the_cause() -> None:
    # Two ranks: the one named deviates from rank 0, and it is rank 0 that has no gradient.
    (finding,) = diagnose_ranks([_norms(0, [[-1.0], [1.0]], [[-1.0], [2.0]])], {})
    assert "rank 0 no gradient" in finding.message
    assert "computed no gradient" in finding.message
    assert "all-reduce" not in finding.message


def test_rank_environment_is_read_and_bad_values_are_one_line_errors() -> None:
    assert current_rank({}) is None
    assert current_rank({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).world_size == 4
    assert current_rank({"RANK": "5", "WORLD_SIZE": "8", "GROUP_RANK": "1"}).node_rank == 1
    with pytest.raises(GradtraceError, match="GROUP_RANK='a' in the environment are not integers"):
        current_rank({"RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "a"})
    with pytest.raises(GradtraceError, match="not integers"):
        current_rank({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(GradtraceError, match="outside WORLD_SIZE"):
        current_rank({"RANK": "2", "WORLD_SIZE": "2"})


def test_without_torchruns_agent_store_a_rank_is_told_to_pass_out_at_once() -> None:
    """A launcher that sets RANK and MASTER_* without torchrun's agent store: nothing would
    answer, so asking would wait AGREE_TIMEOUT (two minutes)."""
    import time

    environ = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    started = time.monotonic()
    with pytest.raises(GradtraceError, match="pass the same --out to every rank"):
        agree_on_job_dir(Path("gradtrace-runs/x"), current_rank(environ), environ)
    assert time.monotonic() - started < 5


def test_wrapper_components_leave_module_paths() -> None:
    assert unwrapped_path("layers.0._fsdp_wrapped_module.attn") == "layers.0.attn"
    assert unwrapped_path("_orig_mod.block._checkpoint_wrapped_module") == "block"
    assert unwrapped_path("encoder.layers.1") == "encoder.layers.1"


def test_check_ranks_without_a_process_group_says_it_compared_nothing(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradtrace.trace(model, out=tmp_path / "run", check_ranks=True):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    (notice,) = load_run(tmp_path / "run").meta["notices"]
    assert "compared nothing" in notice


def _losses(printed: str) -> list[str]:
    return re.findall(r"step \d loss [\d.]+", printed)


SHARDED_PARAMS = {
    f"{layer}.{kind}" for layer in ("up", "mid", "down") for kind in ("weight", "bias")
}


@needs_gloo
@pytest.mark.parametrize(
    "script", ["fsdp_clean.py", "tp_clean.py"], ids=["fsdp2", "tensor-parallel"]
)
def test_sharded_job_trains_as_under_torchrun_and_reports_whole_parameter_norms(
    tmp_path: Path, script: str
) -> None:
    """FSDP2 (each Linear and the root fully_shard'ed) and tensor parallelism (column- and
    row-wise, a replicated bias): each rank records its own shards, and the report's norms
    are those of `full_tensor()`, which the script computes itself (gathering the shards)."""
    job = tmp_path / "job"
    plain = _start(_torchrun_argv(str(SCRIPTS / script)), SCRIPTS)
    # --check-ranks too: sharded parameters differ across ranks by design, never a finding.
    traced = _start(
        _gradtrace_argv(script, job, "--check-ranks"),
        SCRIPTS,
        SHARDED_NORMS_OUT=str(tmp_path / "norms.json"),
    )
    plain, traced = _finish(plain), _finish(traced)
    assert plain.returncode == 0, plain.stderr
    assert traced.returncode == 0, traced.stderr
    assert len(_losses(plain.stdout)) == 5
    assert _losses(traced.stdout) == _losses(plain.stdout)
    summary = " ".join(traced.stderr.split())
    assert "gradient health (rank 0; sharded parameters: all ranks combined)" in summary

    report = _report(job)
    assert report["findings"] == []
    assert report["probe_failures"] == []
    assert [(r["rank"], r["status"], r["steps"]) for r in report["ranks"]] == [
        (0, "ok", 5),
        (1, "ok", 5),
    ]
    # FSDP2 shards every parameter: nothing to compare, and the notice says why; tensor
    # parallel leaves `down` whole, which the ranks compare.
    every_param_sharded = script == "fsdp_clean.py"
    assert any("every parameter is a shard" in n for n in report["run"]["notices"]) == (
        every_param_sharded
    )
    assert report["run"]["notices"] == [] or every_param_sharded
    params = report["grad_stats"]["params"]
    assert set(params) == SHARDED_PARAMS  # the user's names: no FSDP or DTensor wrapper
    whole = json.loads((tmp_path / "norms.json").read_text())
    for name, expected in whole.items():
        got = [norm for _, norm in params[name]["grad_norm"]]
        assert got == pytest.approx(expected, rel=1e-5), name
    # Each rank's own series holds its shards: no rank alone has the whole norm.
    ranks = [load_run(job / f"rank-{rank}") for rank in (0, 1)]
    local = [{p.name: p.grad_norm for p in run.grad_steps[0].params}["up.weight"] for run in ranks]
    assert all(norm < whole["up.weight"][0] for norm in local)


@needs_gloo
def test_inplace_bug_in_an_fsdp2_block_is_named_with_its_line_on_every_rank(
    tmp_path: Path,
) -> None:
    """FSDP2 refills unsharded parameters skipping the version counter: never a finding;
    the user's own in-place write inside the sharded block is."""
    job = tmp_path / "job"
    traced = _gradtrace_job("fsdp_inplace.py", job)
    assert traced.returncode == 1
    assert len(re.findall(r"^RuntimeError: one of the variables needed", traced.stderr, re.M)) == 2
    report = _report(job)
    source = (SCRIPTS / "fsdp_inplace.py").read_text().splitlines()
    culprit = next(n for n, text in enumerate(source, 1) if "# expect:" in text)
    assert sorted((f["kind"], f["rank"]) for f in report["findings"]) == [
        ("inplace-write", 0),
        ("inplace-write", 1),
    ]
    for finding in report["findings"]:
        assert (finding["file"], finding["line"]) == (str(SCRIPTS / "fsdp_inplace.py"), culprit)
        assert (finding["op"], finding["module"]) == ("mul_", "mid")


@needs_gloo
def test_ddp_around_a_compiled_model_trains_as_under_torchrun(tmp_path: Path) -> None:
    # aot_eager: Dynamo, DDP's graph splitting and AOT autograd as with Inductor, without
    # minutes of C++ code generation on a busy CPU.
    env = {"DDP_COMPILE_BACKEND": "aot_eager"}
    job = tmp_path / "job"
    plain = _start(_torchrun_argv(str(SCRIPTS / "ddp_compile.py")), SCRIPTS, **env)
    traced = _start(_gradtrace_argv("ddp_compile.py", job), SCRIPTS, **env)
    plain, traced = _finish(plain), _finish(traced)
    assert plain.returncode == 0, plain.stderr
    assert traced.returncode == 0, traced.stderr
    assert len(_losses(plain.stdout)) == 5
    assert _losses(traced.stdout) == _losses(plain.stdout)
    report = _report(job)
    assert report["findings"] == []
    assert report["probe_failures"] == []
    assert set(report["grad_stats"]["params"]) == PARAMS  # no `module.` or `_orig_mod.`
    assert all(len(stats["grad_norm"]) == 5 for stats in report["grad_stats"]["params"].values())


def _shard_steps(**params: tuple[float, int]) -> list[StepGradStats]:
    """One recorded step: each parameter's (gradient norm, numel) on this rank."""
    stats = tuple(
        ParamStat(name, "m", numel, grad, 1.0, 0.5, 0) for name, (grad, numel) in params.items()
    )
    return [StepGradStats(0, "SGD.step", stats, (), (), (), ())]


def test_shards_combine_into_the_whole_parameter_by_sums_of_squares() -> None:
    # FSDP2: ranks hold disjoint shards (3 and 4 -> 5); rank 0's plain parameter is kept.
    (step,) = combine_shards(
        [_shard_steps(w=(3.0, 6), plain=(7.0, 2)), _shard_steps(w=(4.0, 2), plain=(9.0, 2))],
        {"w": 1},
    )
    whole, plain = step.params
    assert (whole.grad_norm, whole.numel, whole.param_norm) == (5.0, 8, math.sqrt(2))
    assert whole.zero_fraction == 0.5
    assert (plain.grad_norm, plain.numel) == (7.0, 2)
    # A replicated placement over 2 ranks: each holds the whole, counted once.
    (step,) = combine_shards([_shard_steps(w=(3.0, 4)), _shard_steps(w=(3.0, 4))], {"w": 2})
    assert (step.params[0].grad_norm, step.params[0].numel) == (pytest.approx(3.0), 4)


def test_shards_that_cannot_combine_are_unknown_never_a_wrong_number() -> None:
    partial = combine_shards([_shard_steps(w=(3.0, 4)), _shard_steps(w=(4.0, 4))], {"w": 0})
    assert math.isnan(partial[0].params[0].grad_norm)
    one_rank_short = combine_shards([_shard_steps(w=(3.0, 4)), []], {"w": 1})
    assert math.isnan(one_rank_short[0].params[0].grad_norm)
    nan_shard = combine_shards(
        [_shard_steps(w=(math.inf, 4)), _shard_steps(w=(math.nan, 4))], {"w": 1}
    )
    assert math.isnan(nan_shard[0].params[0].grad_norm)  # as full_tensor().norm() would be


def test_fsdp2_internals_are_wrapped_only_while_a_session_runs(tmp_path: Path) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    original = vars(FSDPParamGroup)["unshard"]
    model = torch.nn.Linear(2, 2)
    with gradtrace.trace(model, out=tmp_path / "run"):
        model(torch.ones(1, 2))
        assert vars(FSDPParamGroup)["unshard"] is not original
    assert vars(FSDPParamGroup)["unshard"] is original


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agents(outs: list[Path], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """A two-node job on this machine: two torchrun agents (2 ranks each) meeting through
    c10d rendezvous on 127.0.0.1, each starting `gradtrace run --out OUT` in its ranks."""
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [
        _start(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=two-agents",
                "-m",
                "gradtrace",
                "run",
                "--out",
                str(out),
                str(SCRIPTS / "ddp_clean.py"),
            ],
            cwd,
        )
        for node, out in enumerate(outs)
    ]
    return [_finish(agent) for agent in agents]


def _node_rows(report: dict) -> list[tuple[int, int, str, str]]:
    return [(r["rank"], r["node"], r["host"], r["status"]) for r in report["ranks"]]


@needs_gloo
def test_two_agents_write_one_job_directory_read_as_one_run_with_nodes_and_hosts(
    tmp_path: Path,
) -> None:
    job = tmp_path / "shared" / "job"
    for agent in _agents([job, job], tmp_path):
        assert agent.returncode == 0, agent.stderr
    assert sorted(p.name for p in job.iterdir()) == ["rank-0", "rank-1", "rank-2", "rank-3"]
    report = _report(job)
    host = socket.gethostname()
    # torchrun numbers ranks node by node: GROUP_RANK * nproc-per-node + LOCAL_RANK.
    assert _node_rows(report) == [(rank, rank // 2, host, "ok") for rank in range(4)]
    assert report["run"]["world_size"] == 4
    assert report["findings"] == []
    assert set(report["grad_stats"]["params"]) == PARAMS


@needs_gloo
def test_per_node_directories_are_read_together_as_one_job(tmp_path: Path) -> None:
    nodes = [tmp_path / "node-a" / "job", tmp_path / "node-b" / "job"]
    for agent in _agents(nodes, tmp_path):
        assert agent.returncode == 0, agent.stderr
    held = [sorted(p.name for p in node.iterdir()) for node in nodes]
    assert sorted(held) == [["rank-0", "rank-1"], ["rank-2", "rank-3"]]
    report = _report(*nodes)
    assert [(rank, node, status) for rank, node, _, status in _node_rows(report)] == [
        (rank, rank // 2, "ok") for rank in range(4)
    ]
    assert report["run"]["status"] == "ok"
    # The same node twice, or a directory that is no job's: one line, exit 2.
    for wrong in ([nodes[0], nodes[0]], [nodes[0], nodes[0] / "rank-0"]):
        refused = subprocess.run(
            [sys.executable, "-m", "gradtrace", "report", *map(str, wrong)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2
        assert "recorded twice" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_synthetic_job_of_the_rank_benchmark_reads_as_one_job_and_ls_counts_it(
    tmp_path: Path,
) -> None:
    """scripts/bench_ranks.py's jobs are what it claims (ranks, nodes, hosts, a finding per
    rank), and `ls` counts a closed job from its ranks' counts as `report` derives them."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ranks.py"
    spec = importlib.util.spec_from_file_location("bench_ranks", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.build_rank(tmp_path / "template", steps=12, params=4)
    job_dir = tmp_path / "runs" / "job"
    bench.build_job(job_dir, 10, tmp_path / "template")
    job = load_job([job_dir])
    assert [(r.rank, r.meta["node_rank"], r.meta["host"]) for r in job.ranks] == [
        (rank, rank // 8, f"node-{rank // 8}") for rank in range(10)
    ]
    (entry,) = find_runs(tmp_path / "runs")
    assert entry.findings == len(build_report(job).findings) == 10
    assert (entry.facts.status, entry.facts.steps) == ("ok", 12)
