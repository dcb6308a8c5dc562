"""Capacity model against hand-computed queueing cases."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.capacity import (
    CPU_NODE,
    GPU_TYPES,
    CapacityError,
    ServiceTimes,
    erlang_c,
    p95_response_s,
    plan_capacity,
    servers_for,
)


def test_erlang_c_matches_hand_computed_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    # c = 2, a = 0.5: (a^2/2 / (1 - a/2)) / (1 + a + a^2/2 / (1 - a/2)) = 0.16667 / 1.66667
    assert erlang_c(2, 0.5) == pytest.approx(0.1)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(2, 0.0) == 0.0


def test_p95_response_matches_hand_computed_values():
    # M/M/1, S = 0.1 s, lambda = 5/s: 0.5 e^{-5t} = 0.05 -> t = ln(10)/5
    assert p95_response_s(1, 5.0, 0.1) == pytest.approx(0.1 + math.log(10) / 5)
    # c = 2: C = 0.1 -> t = ln(0.1/0.05) / (2*10 - 5)
    assert p95_response_s(2, 5.0, 0.1) == pytest.approx(0.1 + math.log(2) / 15)
    # C below 5 %: the 95th percentile does not wait at all
    assert p95_response_s(4, 5.0, 0.1) == pytest.approx(0.1)
    assert p95_response_s(1, 20.0, 0.1) == math.inf


def test_servers_for_picks_the_fewest_that_fit():
    assert servers_for(5.0, 0.1, 0.6, "s") == 1  # 0.56 s fits 0.6 s
    assert servers_for(5.0, 0.1, 0.3, "s") == 2  # 0.56 s does not; two servers give 0.146 s
    assert servers_for(100.0, 0.1, 10.0, "s") == 12  # utilisation cap: ceil(10 / 0.85)
    with pytest.raises(CapacityError, match="exceeds its p95 budget"):
        servers_for(1.0, 0.5, 0.4, "gateway")


def test_plan_on_cpu_and_gpu_hand_computed():
    times = ServiceTimes(gateway_s=0.1, model_s={"localization": 0.1, "segmentation": 0.1, "classification": 0.1, "survival": 0.1})
    cpu = plan_capacity(5.0, 600, times)
    # Budget split 50/50 (equal service times): 300 ms per stage -> two servers each (see above).
    assert [s.servers for s in cpu.stages] == [2, 2, 2, 2, 2]
    assert cpu.serve_cpu_replicas == 10 and cpu.cpu_nodes == math.ceil(10 * 2 / CPU_NODE["vcpus"])
    assert cpu.triton_instances == 0 and cpu.gpu_nodes == 0
    assert cpu.usd_per_hour == pytest.approx(cpu.cpu_nodes * CPU_NODE["node_usd_h"])
    gpu = plan_capacity(5.0, 600, times, "a10g")
    # Models 15x faster: 6.7 ms each; the gateway's share grows to 0.1/(0.1+0.00667) of 600 ms.
    assert [s.runs_on for s in gpu.stages] == ["cpu"] + ["triton-gpu"] * 4
    assert gpu.triton_instances == 4 and gpu.gpus == 2 and gpu.gpu_nodes == 2
    assert gpu.usd_per_hour == pytest.approx(gpu.cpu_nodes * CPU_NODE["node_usd_h"] + 2 * GPU_TYPES["a10g"]["node_usd_h"])
    assert gpu.p95_ms <= 600 and any("assumed, not measured" in a for a in gpu.assumptions)


def test_bad_inputs_are_refused(tmp_path):
    times = ServiceTimes(0.1, {"localization": 0.1, "segmentation": 0.1, "classification": 0.1, "survival": 0.1})
    with pytest.raises(CapacityError, match="unknown GPU type"):
        plan_capacity(1, 1000, times, "v100x")
    with pytest.raises(CapacityError, match="positive"):
        plan_capacity(0, 1000, times)
    (tmp_path / "r.json").write_text(json.dumps([{"name": "P1_in_process_p50", "value": 900}]))
    with pytest.raises(CapacityError, match="missing P1_raw_compute_p50"):
        ServiceTimes.from_bench(tmp_path / "r.json")
    with pytest.raises(CapacityError, match="cannot read"):
        ServiceTimes.from_bench(tmp_path / "none.json")


def test_cli_reads_the_committed_benchmark(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["plan", "capacity", "--rps", "2", "--p95-ms", "3000", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["serve_cpu_replicas"] >= 5 and plan["p95_estimate_ms"] <= 3000
    refused = CliRunner().invoke(app, ["plan", "capacity", "--rps", "2", "--p95-ms", "10"])
    assert refused.exit_code == 1 and "exceeds its p95 budget" in refused.output
