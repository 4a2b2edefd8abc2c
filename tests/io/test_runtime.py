"""The one set-up of every script: on a GPU the release's numerics (TF32 convolutions), cudnn.benchmark for fixed
sizes, the named GPU made current; the dtype of --amp; run settings of earlier versions still load."""
from __future__ import annotations

import pytest
import torch

from utils.io import runtime
from utils.io.runtime import RuntimeOptions, amp_dtype
from utils.train.config import TrainConfig


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a machine with two GPUs; the backend flags are restored afterwards."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    for flags, name in ((torch.backends.cudnn, "allow_tf32"), (torch.backends.cudnn, "benchmark"),
                        (torch.backends.cuda.matmul, "allow_tf32")):
        monkeypatch.setattr(flags, name, getattr(flags, name))
    return current


def test_the_gpu_defaults_are_the_releases_and_cuda_n_becomes_current(two_gpus):
    device, memory = RuntimeOptions(device="cuda:1").setup(fixed_sizes=True)
    assert device == torch.device("cuda", 1) and two_gpus == [torch.device("cuda", 1)]
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark
    assert memory == "system allocator"


def test_strict_float32_turns_tf32_off_and_varying_sizes_keep_benchmark_off(two_gpus):
    RuntimeOptions(device="cuda", strict_float32=True).setup()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.benchmark
    assert two_gpus == [torch.device("cuda", 0)]


def test_a_gpu_index_beyond_the_gpus_names_the_ones_there(two_gpus):
    with pytest.raises(ValueError, match=r"'cuda:2' requested but PyTorch sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        RuntimeOptions(device="cuda:2").setup()


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_amp_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)      # emulated bf16 says yes too
    cuda = torch.device("cuda", 0)
    assert amp_dtype(cuda) == expected
    assert amp_dtype(cuda, "fp16") == torch.float16 and amp_dtype(cuda, "bf16") == torch.bfloat16
    assert not runtime.native_bf16(torch.device("cpu"))


def test_a_run_configuration_with_the_retired_tf32_setting_still_loads():
    stored = TrainConfig().to_dict()
    stored["runtime"] = {k: v for k, v in stored["runtime"].items() if k != "strict_float32"} | {"tf32": False}
    assert TrainConfig.from_dict(stored).runtime == RuntimeOptions()
    flat = {"dataset": "demo", "tf32": True, "device": "cpu"}          # the flat layout of earlier versions
    assert TrainConfig.from_dict(flat).runtime == RuntimeOptions(device="cpu")
