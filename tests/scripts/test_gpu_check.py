"""benchmarks/gpu_check.py, the driver of gpu_check.sh: a step out of time fails the run (exit 1) and says so, each
result is written as it is recorded, and a second run writes a new folder. (CI runs the whole dry run.)"""
from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_that_cannot_run_fail_the_check_and_each_run_keeps_its_own_results(tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("GPU_CHECK_SECONDS", "2")             # no step gets its minimum of 5 s
    assert gpu_check.main(["--dry-run"]) == 1
    assert gpu_check.main(["--dry-run"]) == 1
    runs = sorted((tmp_path / "gpu_check").iterdir())
    assert len(runs) == 2
    rows = [json.loads(line) for line in (runs[0] / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["machine", "cuda_tests", "step_fp32", "step_amp", "epoch", "inference",
                                         "ddp"]
    assert rows[0]["status"] == "passed" and all(r["status"] == "failed" for r in rows[1:])
    out = capsys.readouterr().out
    assert "verdict: FAILED: cuda_tests, step_fp32, step_amp, epoch, inference, ddp" in out


def test_the_verdict_passes_when_every_step_passed_or_was_skipped(tmp_path, capsys):
    gpu_check = _gpu_check()
    check = gpu_check.Check(tmp_path, 60)
    check.record("cuda_tests", "skipped", "no GPU")
    check.record("step_fp32", "passed", "0.1 s/iteration", s_per_iter=0.1)
    assert gpu_check.verdict(check) == 0
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[1])["s_per_iter"] == 0.1
    check.record("epoch", "failed", "run_0.py exit 1")
    assert gpu_check.verdict(check) == 1
    assert "epoch       failed   run_0.py exit 1" in capsys.readouterr().out
