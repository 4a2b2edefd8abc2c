"""Run by tests/train/test_distributed.py under torchrun (two gloo ranks): batch norm of a shared batch split
unequally between the ranks (4 and 2 images), with the statistics of both; writes this rank's outputs and
gradients to OUT/rank<r>.pt.

    _sync_bn_worker.py OUT"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.batchnorm import sync_batch_norm  # noqa: E402

SHARES = (slice(0, 4), slice(4, 6))


def batch() -> dict[str, torch.Tensor]:
    """The whole batch, the same on every rank: input, a weighting of the outputs (the loss), weight, bias."""
    generator = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(6, 3, 5, 5, generator=generator)
    return {"x": x, "r": torch.randn(x.shape, generator=generator),
            "weight": torch.randn(3, generator=generator), "bias": torch.randn(3, generator=generator)}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole = batch()
    x = whole["x"][SHARES[rank]].clone().requires_grad_(True)
    weight, bias = whole["weight"].clone().requires_grad_(True), whole["bias"].clone().requires_grad_(True)
    y, mean, var = sync_batch_norm(x, weight, bias, 1e-5)
    (y * whole["r"][SHARES[rank]]).sum().backward()
    torch.save({"y": y.detach(), "mean": mean, "var": var, "grad_x": x.grad, "grad_weight": weight.grad,
                "grad_bias": bias.grad}, Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
