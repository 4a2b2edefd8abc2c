"""The fast paths compute what the plain model computes: inference (optimize_for_inference), the rewritten
convolutions of model.ops, and the training switches (channels_last, per-stage checkpointing)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from model import DCONet, DCONetConfig, from_release_state_dict, to_release_state_dict
from model.bsgu import BSGU
from model.checkpoint import release_gradients
from model.fast import BF16_T_RTOL, optimize_for_inference
from model.ops import conv_from_one, conv_to_one

EVAL_ATOL, TRAIN_ATOL, STATS_ATOL, GRAD_RTOL = 1e-4, 1e-4, 1e-5, 2e-2   # ../shared/reference/README.md
# Train-mode outputs in channels_last layout: PyTorch's channels_last BatchNorm sums the batch statistics less
# exactly than its NCHW kernel. Measured max |T - T_release|: 7.2e-5 with 2 threads, 1.17e-4 with 1 (NCHW:
# 1.1e-5 and 1.3e-5). Hence channels_last is an opt-in for training (--memory-format), not the default.
CL_TRAIN_ATOL = 2.5e-4


@pytest.fixture(scope="module")
def reference():
    return torch.load(shared_path("reference", "dconet_k2_seed0.pt"), weights_only=True)


def _model(stage_num: int, seed: int = 0) -> DCONet:
    """A model with no trivially zero or one parameter and non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = DCONet(DCONetConfig(stage_num=stage_num))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- model.ops -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("nhwc", [False, True])
def test_one_channel_convolutions_match_conv2d(k, nhwc):
    torch.manual_seed(k)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    x = torch.randn(2, 1, 12, 20, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 1, k, k, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, dtype=torch.double, requires_grad=True)
    y, y_ref = conv_from_one(x, w, b, nhwc), F.conv2d(x, w, b, padding=k // 2)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y_ref).contiguous(memory_format=fmt)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert torch.allclose(a, r, atol=1e-10)
    assert torch.allclose(y, y_ref, atol=1e-10)

    x = torch.randn(2, 6, 12, 20, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(1, 6, k, k, dtype=torch.double, requires_grad=True)
    b = torch.randn(1, dtype=torch.double, requires_grad=True)
    y, y_ref = conv_to_one(x, w, b), F.conv2d(x, w, b, padding=k // 2)
    g = torch.randn_like(y_ref)
    assert torch.allclose(y, y_ref, atol=1e-10)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert torch.allclose(a, r, atol=1e-10)


def test_composed_gates_equal_the_two_convolutions_border_included():
    torch.manual_seed(4)
    bsgu = BSGU(8, first_stage=False).double()
    for p in bsgu.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 1, 9, 13, dtype=torch.double, requires_grad=True)
    z, z_ref = bsgu.gate_preactivations(x), bsgu.gates(bsgu.conv_x(x))
    assert torch.allclose(z, z_ref, atol=1e-9)
    params = (x, bsgu.conv_x.weight, bsgu.conv_x.bias, bsgu.gates.weight, bsgu.gates.bias)
    g = torch.randn_like(z)
    for a, r in zip(torch.autograd.grad(z, params, g), torch.autograd.grad(z_ref, params, g)):
        assert torch.allclose(a, r, atol=1e-9)


# --- inference ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"channels_last": False}, {"sub_batch": 2}])
def test_fast_inference_matches_reference(reference, options):
    model = from_release_state_dict(reference["state_dict"]).eval()
    fast = optimize_for_inference(model, **options)
    D, T = fast(reference["input"])
    assert D.dtype == T.dtype == torch.float32 and T.shape == reference["input"].shape
    assert (D - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T - reference["eval"]["T"]).abs().max() < EVAL_ATOL


@pytest.mark.parametrize("stage_num, shape", [(1, (1, 1, 32, 32)), (2, (3, 1, 64, 96)), (3, (2, 1, 96, 64))])
def test_fast_inference_matches_the_model(stage_num, shape):
    model = _model(stage_num, seed=stage_num).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        D, T, stages = model(x, return_stages=True)
    for options in ({}, {"channels_last": False, "sub_batch": 2}):
        fast = optimize_for_inference(model, **options)
        D2, T2, stages2 = fast(x, return_stages=True)
        assert (D2 - D).abs().max() < EVAL_ATOL and (T2 - T).abs().max() < EVAL_ATOL
        assert len(stages2) == stage_num
        for a, b in zip(stages, stages2):
            for u, v in zip(a, b):
                assert u.shape == v.shape and (u - v).abs().max() < EVAL_ATOL
        assert torch.equal(fast(x)[1], T2)


def test_fast_bf16_within_its_bound_on_the_reference(reference):
    model = from_release_state_dict(reference["state_dict"]).eval()
    D, T = optimize_for_inference(model, bf16=True)(reference["input"])
    assert T.dtype == D.dtype == torch.float32
    T_ref = reference["eval"]["T"]
    error = (T - T_ref).abs().max().item()
    assert 0 < error < BF16_T_RTOL * T_ref.abs().max().item()    # bfloat16 does change the numbers, within the bound
    assert (D - reference["eval"]["D"]).abs().max() < BF16_T_RTOL * reference["eval"]["D"].abs().max()


def test_fast_bf16_keeps_the_logit_carrying_input_in_float32():
    """B + T carries the logits into the reconstruction: rounding it to bfloat16 made T ten times less exact on
    trained weights (2e-2 of max |T| on NUAA-SIRST instead of 2e-3)."""
    fast = optimize_for_inference(DCONet(DCONetConfig(stage_num=2)), bf16=True)
    for stage in fast.stages:
        assert stage.p.rec0_w.dtype == torch.float32 and stage.p.rec1_w.dtype == torch.bfloat16
        assert stage.p.bsgu_gates5_w.dtype == torch.bfloat16 and stage.p.conv_in_w.dtype == torch.float32


@pytest.mark.parametrize("perturbed", [False, True])
def test_fast_bf16_within_its_bound_on_real_images(perturbed):
    cv2 = pytest.importorskip("cv2")
    folder = shared_path("data", "NUAA-SIRST", "test", "images")
    files = sorted(folder.glob("*.png"))[:2]
    assert files, f"no images in {folder}"
    images = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (128, 128)) for f in files]
    x = torch.stack([torch.from_numpy(i).float() / 255 for i in images]).unsqueeze(1)
    torch.manual_seed(5)
    model = (_model(5, seed=5) if perturbed else DCONet(DCONetConfig(stage_num=5))).eval()
    with torch.no_grad():
        _, T = model(x)
    _, T_bf16 = optimize_for_inference(model, bf16=True)(x)
    assert (T_bf16 - T).abs().max() < BF16_T_RTOL * T.abs().max()


def test_optimize_for_inference_copies_and_checks():
    model = _model(2).train()
    fast = optimize_for_inference(model)
    assert model.training and not fast.training            # the model is left as it was
    with pytest.raises(ValueError, match="multiples of 32"):
        fast(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match="unknown"):
        optimize_for_inference(model, bf16=("decoder",))
    with pytest.raises(TypeError, match="DCONet"):
        optimize_for_inference(torch.nn.Conv2d(1, 1, 3))


# --- training ------------------------------------------------------------------------------------------------------

def _train_step(model: DCONet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    D, T = model(x)
    loss = torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointing_keeps_loss_gradients_and_statistics():
    plain = _model(3).train()
    recomputed = copy.deepcopy(plain).set_checkpointing(True)
    x = torch.rand(2, 1, 64, 64)
    loss, grads = _train_step(plain, x)
    loss2, grads2 = _train_step(recomputed, x)
    assert abs(loss.item() - loss2.item()) < 1e-7
    for name, g in grads.items():                            # the same operations, run again
        assert (grads2[name] - g).norm() <= 1e-6 * g.norm() + 1e-9, name
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name                   # recomputation does not count a batch twice
        else:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name


def _saved_bytes(model: DCONet, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors that the forward keeps for the backward pass (outside recomputation)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        D, T = model(x)
    return sum(seen.values())


def test_checkpointing_keeps_a_fraction_of_the_activations():
    x = torch.rand(2, 1, 64, 64)
    plain = _saved_bytes(_model(4).train(), x)
    recomputed = _saved_bytes(_model(4).train().set_checkpointing(True), x)
    assert recomputed < 0.5 * plain                          # about one stage of K = 4


@pytest.mark.parametrize("checkpointing, channels_last", [(True, False), (False, True), (True, True)])
def test_training_switches_match_reference(reference, checkpointing, channels_last):
    model = from_release_state_dict(reference["state_dict"]).train()
    model.set_checkpointing(checkpointing).set_channels_last(channels_last)
    x = reference["input"]
    D, T = model(x)
    atol = CL_TRAIN_ATOL if channels_last else TRAIN_ATOL
    assert (D - reference["train"]["D"]).abs().max() < atol
    assert (T - reference["train"]["T"]).abs().max() < atol
    loss = torch.sigmoid(T).mean() + 0.1 * ((D - x) ** 2).mean()
    assert abs(loss.item() - reference["loss"].item()) < 1e-5
    loss.backward()
    grads = release_gradients(model)
    for key, expected in reference["grads"].items():
        assert _rel(grads[key], expected) < GRAD_RTOL, key
    after, expected = to_release_state_dict(model), reference["train"]["state_dict_after"]
    for key in (k for k in expected if ".lowrank.convs." not in k):
        if key.endswith("num_batches_tracked"):
            assert after[key].item() == expected[key].item(), key
        else:
            assert torch.allclose(after[key], expected[key], rtol=0, atol=STATS_ATOL), key
