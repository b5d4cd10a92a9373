"""CUDA correctness (marked ``gpu``; skipped without CUDA): the CaloFlow-size teacher's log-probability and
the student's samples on CUDA equal the CPU's within float32 tolerance; a training step and a distillation
step run on CUDA; ``calodistill bench --device cuda``; a tracked pipeline whose GPU stage shows the GPU in
MLflow's system metrics (the ``gpu`` extra: pynvml).

Run on a GPU machine: ``pytest -m gpu tests/gpu`` (scripts/gpu-check.sh does, with the benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: CaloChallenge dataset 1 photons: 368 voxels, 5 layers (context: energy + layer energies); CaloFlow sizes.
D, C, TEACHER_HIDDEN, STUDENT_HIDDEN = 368, 6, 378, 736


@pytest.fixture(autouse=True)
def _full_float32() -> Iterator[None]:
    """Plain float32 matmuls (no TF32), as on the CPU, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    """Random-initialised CaloFlow-size teacher (MAF) and student (IAF), on the CPU."""
    from calodistill.pipeline.stages.bench import build_models

    teacher, student = build_models(D, C, TEACHER_HIDDEN, STUDENT_HIDDEN, n_blocks=8, seed=0)
    return teacher.eval(), student.eval()


def _on(flow: Any, device: str) -> Any:
    """A copy of ``flow`` on ``device``, without the CPU copy's cached masked weights."""
    import copy

    flow = copy.deepcopy(flow)
    flow.set_weight_cache(True)  # clears the cache
    return flow.to(device)


def _batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randn(n, C, generator=gen)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double().cpu() - b.double().cpu()).abs() / b.double().cpu().abs().clamp_min(1.0)).max())


def test_teacher_log_prob_equals_cpu(models: tuple[Any, Any]) -> None:
    teacher, _ = models
    x, c = _batch(512)
    gpu_teacher = _on(teacher, "cuda")  # copied outside inference mode (its tensors would be inference tensors)
    with torch.inference_mode():
        cpu = teacher.log_prob(x, c)
        gpu = gpu_teacher.log_prob(x.cuda(), c.cuda())
    assert gpu.is_cuda and torch.isfinite(gpu).all()
    assert _relative(gpu, cpu) < 1e-4  # float32 rounding of 8 blocks × 368 dimensions, different kernels


def test_student_sampling_equals_cpu(models: tuple[Any, Any]) -> None:
    from calodistill.flows.fast import FastIAFSampler

    _, student = models
    z, c = _batch(512, seed=2)
    gpu_student = _on(student, "cuda")
    with torch.inference_mode():
        x_cpu, lad_cpu = student.inverse(z, c)
        x_gpu, lad_gpu = gpu_student.inverse(z.cuda(), c.cuda())
        fast = FastIAFSampler(gpu_student, chunk_size=256)  # the sampler generation uses
        x_fast, lad_fast = fast.sample(z.cuda(), c.cuda(), need_logabsdet=True)
    assert x_gpu.is_cuda and torch.isfinite(x_gpu).all()
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-4, atol=1e-4)
    assert _relative(lad_gpu, lad_cpu) < 1e-4
    torch.testing.assert_close(x_fast.cpu(), x_cpu, rtol=1e-4, atol=1e-4)
    assert lad_fast is not None and _relative(lad_fast, lad_cpu) < 1e-4


def test_training_step_on_cuda_equals_cpu(models: tuple[Any, Any]) -> None:
    from calodistill.flows.losses import nll_loss

    teacher, _ = models
    x, c = _batch(128, seed=3)
    losses, grads = {}, {}
    for device in ("cpu", "cuda"):
        flow = _on(teacher, device).train()
        opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
        loss = nll_loss(flow, x.to(device), c.to(device))
        loss.backward()
        grads[device] = torch.cat([p.grad.flatten().cpu() for p in flow.parameters() if p.grad is not None])
        opt.step()
        losses[device] = float(loss)
        assert all(p.device.type == device for p in flow.parameters())
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
    assert torch.isfinite(grads["cuda"]).all()
    cos = torch.nn.functional.cosine_similarity(grads["cuda"].double(), grads["cpu"].double(), dim=0)
    assert float(cos) > 0.9999


def test_distillation_step_on_cuda(models: tuple[Any, Any]) -> None:
    from calodistill.flows.distillation import distillation_step_loss

    teacher, student = models
    frozen = _on(teacher, "cuda").eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    s = _on(student, "cuda").train()
    opt = torch.optim.Adam(s.parameters(), lr=1e-4)
    x, c = _batch(175, seed=4)  # CaloFlow II's student batch
    before = [p.detach().clone() for p in s.parameters()]
    loss, comps = distillation_step_loss(frozen, s, x.cuda(), c.cuda(), beta=0.5, fully_guided=True)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in comps.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in s.parameters() if p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(before, s.parameters(), strict=True))
    assert all(p.grad is None for p in frozen.parameters())


def test_bench_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cuda", "--quick", "--sections", "sampling,floor,training", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device_info"]["device"].startswith("cuda") and result["device_info"]["gpu"]
    assert [r["batch"] for r in result["sampling"]["rows"]] == [1, 10, 100]
    for row in result["sampling"]["rows"]:
        assert row["student_fast"]["ms_per_shower"] > 0 and row["teacher"]["ms_per_shower"] > 0
    for model in ("teacher", "student"):
        assert result["training"][model]["showers_per_s"] > 0
    assert "|" in capsys.readouterr().out  # the markdown table


def test_mlflow_system_metrics_show_the_gpu(tmp_path: Path) -> None:
    """A GPU stage of a tracked pipeline: its MLflow run has GPU utilisation and memory system metrics,
    and it ran with its worker's own CUDA device."""
    pytest.importorskip("pynvml", reason="the gpu extra (pip install -e '.[gpu]')")
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.orchestration.runner import run_pipeline

    dag = tmp_path / "gpu.yaml"
    dag.write_text(yaml.safe_dump({
        "name": "gpu_metrics",
        "tracking": {"experiment": "calodistill-gpu-test", "system_metrics_interval": 1},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
        "stages": {
            "ingest": {"kind": "ingest", "inputs": {"sources": ["synth:calogan?n=2000&seed=1&spectrum=uniform"]},
                       "params": {"geometry": "calogan"}},
            "train_teacher": {"kind": "train_teacher", "gpu": True, "inputs": {"data": "ingest.dataset"}, "params": {
                "seed": 0, "check_samples": 0,
                "flow1": {"model": {"n_blocks": 2, "hidden_features": 32}, "train": {"epochs": 2, "batch_size": 128}},
                "teacher": {"model": {"n_blocks": 2, "hidden_features": 128, "kind": "spline"},
                            "train": {"epochs": 20, "batch_size": 128}}}},
        },
    }))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_pipeline(dag, run_root=tmp_path / "runs", tracking_uri=uri)
    assert summary.ok, summary.format_table()
    marker = json.loads((tmp_path / "runs" / "gpu_metrics" / "train_teacher" / "_COMPLETE.json").read_text())
    assert marker["tags"]["cuda_visible_devices"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("calodistill-gpu-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id],
                                                          f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")}
    run = runs["train_teacher"]
    assert "cuda" in run.data.tags.get("device", "")
    keys = set(run.data.metrics)
    assert any(k.startswith("system/gpu_0_") and "utilization" in k for k in keys), sorted(keys)
    assert any(k.startswith("system/gpu_0_") and "memory" in k for k in keys), sorted(keys)
