"""``tritonorm info`` and ``tritonorm bench``: the report's content, text and JSON; the bench
table on the CPU (columns, finite numbers, one row per measured case), the files of --out,
the fused-norm and end-to-end sections, the errors of a bad --only and of --device cuda
without CUDA."""

import importlib.util
import json
import math
import os
import platform
import re

import pytest
import torch
import triton

import tritonorm
from tritonorm._dispatch import ENV_VAR, describe, resolve_backend
from tritonorm.bench import enorm_cases, fused_cases, lp_cases, roofline, stack_cases
from tritonorm.bench.bwn_cases import COMPILED_CONTENDERS
from tritonorm.bench.lp_cases import COMPILED
from tritonorm.cli import bench, main

# (op, contender) of the rows that the "/ torch" column divides by.
TORCH_BASELINES = {("bn", "nn.BatchNorm2d"), ("conv+bn", "nn.Conv2d+nn.BatchNorm2d"), ("enorm", "sgd-step"),
                   ("bounded-wn", "weight_norm"), ("equinorm input_sums", "reference-eager"),
                   ("equinorm weight_transform", "reference-eager"), ("bn+relu", "torch-eager"),
                   ("bn+add+relu", "torch-eager"), ("stack bn", "eager")}
FUSED_OPS = {f"{norm}-bn+{epilogue}" for norm in ("l1", "linf", "topk") for epilogue in ("relu", "add+relu")} | {
    "bn+relu", "bn+add+relu"}
STACK_OPS = {f"stack {norm}" for norm in stack_cases.NORMS}
HEADERS = ["op", "contender", "shape", "dtype", "pass", "time (us)", "GB/s", "floor/time", "/ torch", "/ compiled"]


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def eager_only(monkeypatch):
    """``plan_for`` without the torch.compile contenders: a cold inductor compile takes about
    30 s a section on 2 CPU cores (``benchmarks/`` runs them)."""
    plan_for = roofline.plan_for

    def eager(device, quick=False):
        plan = plan_for(device, quick)
        return plan._replace(
            lp_cases=[case for case in plan.lp_cases if case[1] != COMPILED], equinorm_compiled=(),
            bwn_contenders=tuple(n for n in plan.bwn_contenders if n not in COMPILED_CONTENDERS),
            fused_cases=[case for case in plan.fused_cases if not fused_cases.is_compiled(case)],
            stack_contenders=tuple(c for c in plan.stack_contenders if c[1] != stack_cases.COMPILED),
        )

    monkeypatch.setattr(roofline, "plan_for", eager)


def info_json(capsys) -> dict:
    assert main(["info", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_versions_device_environment(capsys, no_backend_env):
    report = info_json(capsys)
    assert set(report) == {"versions", "device", "environment", "backend", "extras"}
    assert report["versions"] == {
        "tritonorm": tritonorm.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": triton.__version__, "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        assert report["device"]["type"] == "cuda"
        assert (report["device"]["name"], report["device"]["sm_count"]) == (props.name, props.multi_processor_count)
        assert report["device"]["capability"] == f"{props.major}.{props.minor}"
        assert report["device"]["memory_gib"] > 0
    else:
        assert report["device"]["type"] == "cpu" and report["device"]["cores"] >= 1
    assert report["environment"] == {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), ENV_VAR: None}


def test_info_json_backend_and_extras(capsys, no_backend_env):
    report = info_json(capsys)
    kinds = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    assert report["backend"] == {
        "auto": {kind: resolve_backend("auto", torch.empty(0, device=kind)) for kind in kinds}, "why": describe(),
    }
    assert report["backend"]["auto"]["cpu"] == "torch"
    assert set(report["extras"]) == {"scikit-learn", "matplotlib", "tqdm"}
    for dist, module in (("scikit-learn", "sklearn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        importable = importlib.util.find_spec(module) is not None
        assert report["extras"][dist]["importable"] is importable
        assert (report["extras"][dist]["version"] is not None) is importable


def test_info_text(capsys, no_backend_env):
    assert main(["info"]) == 0
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["tritonorm"] == tritonorm.__version__
    assert lines["torch"].startswith(torch.__version__ + " (CUDA build: ")
    assert lines["triton"] == triton.__version__
    assert lines["python"] == platform.python_version()
    assert lines["device"].startswith("cuda:" if torch.cuda.is_available() else "cpu (")
    assert f"{ENV_VAR}=unset" in lines["environment"]
    assert lines["backend auto"].startswith("cpu tensors -> torch")
    assert lines["why"] == describe()
    assert set(re.findall(r"(scikit-learn|matplotlib|tqdm)", lines["extras"])) == {"scikit-learn", "matplotlib",
                                                                                   "tqdm"}


def test_info_reports_the_environment_override(capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    report = info_json(capsys)
    assert report["environment"][ENV_VAR] == "torch"
    assert set(report["backend"]["auto"].values()) == {"torch"}
    assert report["backend"]["why"] == f"{ENV_VAR}=torch forces the 'torch' backend"


def test_info_reports_a_bad_environment_value_without_failing(capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cudnn")
    report = info_json(capsys)
    assert report["backend"]["auto"]["cpu"].startswith(f"error: the environment variable {ENV_VAR} must be one of")
    assert "'cudnn'" in report["backend"]["auto"]["cpu"]


def table(out: str) -> list[list[str]]:
    """The header and the rows of the printed table, cells split at two or more spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert set(lines[start + 1]) == {"-", " "}
    end = lines.index("", start)
    return [re.split(r"\s{2,}", line.strip()) for line in [lines[start], *lines[start + 2:end]]]


def number(cell: str) -> float | None:
    return None if cell == "-" else float(cell.rstrip("%"))


def check_rows(rows: list[list[str]]) -> None:
    """Every row has every column; times positive; GB/s, floor fractions and ratios finite
    where given."""
    for row in rows:
        assert len(row) == len(HEADERS), row
        assert number(row[5]) > 0, row
        for cell in row[6:]:
            assert cell == "-" or math.isfinite(number(cell)), row


def test_bench_cpu_enorm_table_and_files(capsys, tmp_path):
    assert main(["bench", "--device", "cpu", "--quick", "--only", "enorm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tritonorm bench on cpu (tiny cases, PyTorch paths only): torch " + torch.__version__)
    header, *rows = table(out)
    assert header == HEADERS
    check_rows(rows)
    nets = {net.name for net in enorm_cases.SMALL_NETS}
    assert {(r[0], r[2], r[4]) for r in rows} == {("enorm", net, p) for net in nets for p in ("cycle", "step")}
    assert {r[1] for r in rows} == {"enorm-torch-parallel", "per-layer-loop", "sgd-step"}
    for r in rows:
        assert (r[1] == "sgd-step") == (r[6] == "-"), r  # the SGD step has no floor bytes
        assert (r[8] == "1.00") == (r[1] == "sgd-step"), r  # / torch is over the SGD step

    (json_file,) = tmp_path.glob("*.json")
    record = json.loads(json_file.read_text())
    assert record["meta"]["sections"] == ["enorm"] and record["errors"] == []
    stem = f"cpu-{record['meta']['date']}-enorm"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert f"wrote {tmp_path / stem}.md and {tmp_path / stem}.json" in out
    assert [f"{r['time_us']:.1f}" for r in record["enorm"]] == [r[5] for r in rows]
    assert "## ENorm" in (tmp_path / f"{stem}.md").read_text()


def test_bench_cpu_every_section_one_table(capsys, eager_only):
    assert main(["bench", "--device", "cpu"]) == 0
    header, *rows = table(capsys.readouterr().out)
    assert header == HEADERS
    check_rows(rows)
    assert {r[0] for r in rows} == {
        "l1-bn", "linf-bn", "topk-bn", "mean_only-bn", "bn", "equinorm", "equinorm norm-only", "conv", "conv+bn",
        "equinorm input_sums", "equinorm weight_transform", "enorm", "bounded-wn", *FUSED_OPS, *STACK_OPS,
    }
    assert {r[3] for r in rows} == {"fp32"}
    assert {r[4] for r in rows} == {"forward", "forward+backward", "backward", "cycle", "step"}
    for r in rows:
        if (r[0], r[1]) in TORCH_BASELINES:
            assert r[8] == "1.00", r
        if r[0] in ("equinorm", "equinorm norm-only", "conv", "conv+bn", *STACK_OPS):
            assert r[6] == r[7] == "-", r  # layers: no bytes
        elif r[1] != "sgd-step":
            assert r[6] != "-" and r[7].endswith("%"), r


def test_table_rows_match_the_record(eager_only):
    plan = roofline.plan_for("cpu")
    result = roofline.run(plan, ("lp", "bwn"), peak_gbps=1.0, log=lambda message: None)
    rows = bench.table_rows(result.record)
    assert len(rows) == len(result.record["rows"]) + len(result.record["bounded_weight_norm"])
    lp = [r for r in rows if r["op"].endswith("bn")]
    assert [r["time_us"] for r in lp] == [r["time_us"] for r in result.record["rows"]]
    for row in rows:
        assert row["floor_fraction"] == pytest.approx(row["gbps"] / 1.0)  # peak 1 GB/s


def test_format_table_dashes_and_alignment():
    row = {"op": "enorm", "contender": "sgd-step", "shape": "mlp 4-4", "dtype": "fp32", "pass": "step",
           "time_us": 12.345, "gbps": None, "floor_fraction": 0.5, "vs_torch": 1.0, "vs_compiled": None}
    header, rule, line = bench.format_table([row]).splitlines()
    assert re.split(r"\s{2,}", line) == ["enorm", "sgd-step", "mlp 4-4", "fp32", "step", "12.3", "-", "50.0%", "1.00",
                                         "-"]
    assert len(header) == len(rule) >= len(line)
    assert line.endswith(" -") and header.endswith("/ compiled")


def test_bench_bad_only_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--only", "batchnorm"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--only: invalid choice: 'batchnorm'" in err
    assert all(section in err for section in roofline.SECTIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_bench_cuda_without_cuda(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_enorm_quick(capsys):
    assert main(["bench", "--quick", "--only", "enorm"]) == 0
    _header, *rows = table(capsys.readouterr().out)
    check_rows(rows)
    assert {"enorm-triton-parallel", "enorm-triton-sequential"} <= {r[1] for r in rows}


def test_bench_cpu_fused_and_stack_sections(capsys, tmp_path, eager_only):
    assert main(["bench", "--device", "cpu", "--only", "fused", "--only", "stack", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header, *rows = table(out)
    assert header == HEADERS
    check_rows(rows)
    fused, stack = [r for r in rows if r[0] in FUSED_OPS], [r for r in rows if r[0] in STACK_OPS]
    assert len(fused) + len(stack) == len(rows)
    # every fused op, with its contenders (the norms on the PyTorch path here), in both passes
    assert {(r[0], r[1], r[4]) for r in fused} == {
        (op, "torch-eager" if op.startswith("bn") else "reference-eager", p)
        for op in FUSED_OPS for p in ("forward", "forward+backward")}
    for r in fused:
        assert r[2] == "x".join(map(str, lp_cases.SMOKE_SHAPE)) and r[7].endswith("%"), r
        assert r[9] == "-", r  # no compiled contender ran (eager_only)
    smoke = stack_cases.SMOKE_CASE
    assert {(r[0], r[1], r[2], r[4]) for r in stack} == {(op, "eager", smoke.name, "step") for op in STACK_OPS}
    assert all(r[6] == r[7] == r[9] == "-" for r in stack)  # no bytes, no compiled bn stack

    (json_file,) = tmp_path.glob("*.json")
    record = json.loads(json_file.read_text())
    assert record["meta"]["sections"] == ["fused", "stack"] and record["errors"] == []
    assert json_file.name == f"cpu-{record['meta']['date']}-fused-stack.json"
    x_bytes = math.prod(lp_cases.SMOKE_SHAPE) * 4
    for r in record["fused"]:  # the floor: 2 + 3 passes, 3 + 4 with the residual
        residual = r["epilogue"] == fused_cases.RESIDUAL_RELU
        passes = {"forward": 2 + residual, "forward+backward": 5 + 2 * residual}[r["pass"]]
        assert r["compulsory_bytes"] == passes * x_bytes, r
        assert r["algorithm_bytes"] is None and r["path"] is None, r  # Triton rows only
    assert [r["norms"] for r in record["stack"]] == [16] * 4  # 4 blocks x 3 + 4 shortcut norms
    page = (tmp_path / json_file.name.replace(".json", ".md")).read_text()
    assert "## Fused batch norm + ReLU (+ residual add)" in page and "## End to end" in page
