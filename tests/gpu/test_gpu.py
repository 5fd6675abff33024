"""CUDA checks: pytest -m gpu (each test is skipped, with its reason, without a GPU)."""

from __future__ import annotations

import pytest
import torch

from capsnet.routing import dynamic_routing
from capsnet.training import run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_routing_on_cuda_matches_cpu() -> None:
    u_hat = torch.randn(8, 1152, 10, 16, dtype=torch.float64)
    v_cpu, c_cpu = dynamic_routing(u_hat, 3)
    v_gpu, c_gpu = dynamic_routing(u_hat.cuda(), 3)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu)
    torch.testing.assert_close(c_gpu.cpu(), c_cpu)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_on_gpu(precision: str, make_cfg) -> None:
    cfg = make_cfg("trainer=gpu", f"trainer.precision={precision}", "data.train_subset=2048",
                   "trainer.limit_train_batches=null", "data.val_subset=500")
    record = run(cfg)
    assert record["status"] == "completed", record
    assert record["val_error"] < 0.9


@pytest.mark.gpu
@needs_cuda
def test_same_seed_same_result_on_gpu(make_cfg, tmp_path) -> None:
    records = [
        run(make_cfg("trainer=gpu", "deterministic=true", output_dir=tmp_path / name))
        for name in ("first", "second")
    ]
    assert records[0]["val_error"] == records[1]["val_error"]
