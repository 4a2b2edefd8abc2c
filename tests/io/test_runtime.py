"""The one set-up of every script: on a GPU the release's numerics (TF32 convolutions), cudnn.benchmark for fixed
sizes, the named GPU made current; the dtype of --amp; run settings of earlier versions still load."""
from __future__ import annotations

import pytest
import torch

from conftest import TORCH_FLAGS, kept_torch_flags
from model.ops import gpu_forms
from utils.io import runtime
from utils.io.runtime import RuntimeOptions, amp_dtype, forced_gpu_paths, gpu_paths
from utils.train.config import TrainConfig


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a machine with two GPUs (the backend flags that set-up changes are put back by
    conftest's ``restore_torch_flags``)."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
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


def test_forced_gpu_paths_take_the_gpus_set_up_on_the_cpu():
    cpu = torch.device("cpu")
    assert not gpu_paths(cpu) and not gpu_forms(cpu)
    with forced_gpu_paths():
        assert gpu_paths(cpu) and gpu_forms(cpu)        # the model's kernels read the same switch
        torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
        RuntimeOptions(device="cpu").setup(fixed_sizes=True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32
    assert not gpu_paths(cpu) and not gpu_forms(cpu)
    torch.backends.cudnn.benchmark = False
    RuntimeOptions(device="cpu").setup(fixed_sizes=True)          # the CPU's own paths leave the flags alone
    assert not torch.backends.cudnn.benchmark


def test_the_suite_puts_back_every_flag_a_test_changes():
    def flags() -> dict:
        return {name: read() for name, (read, _) in TORCH_FLAGS.items()}

    before = flags()
    with kept_torch_flags():
        for name in ("cudnn.allow_tf32", "cudnn.benchmark", "cudnn.deterministic"):
            setattr(torch.backends.cudnn, name.split(".")[1], not before[name])
        # the precision moves cuda.matmul.allow_tf32 with it (one setting seen two ways)
        torch.set_float32_matmul_precision("medium" if before["float32_matmul_precision"] == "highest" else "highest")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1 if before["num_threads"] > 1 else 2)
        with forced_gpu_paths():
            changed = flags()
    assert all(changed[name] != before[name] for name in before), (before, changed)
    assert flags() == before


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
