"""The fast forms compute what the plain model computes: each block's deploy form (``reparameterize``) and
``optimize_for_inference``, the speed kernels of model.ops (``set_fast_kernels``), and the training switches
(channels_last, per-stage checkpointing)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import model.bsgu as bsgu_module
from conftest import (EVAL_ATOL, GRAD_RTOL, STATS_ATOL, TRAIN_ATOL, perturbed_model, reference_loss,
                      shared_path)
from model import DCONet, DCONetConfig, from_release_state_dict, to_release_state_dict
from model.bsgu import BSGU
from model.checkpoint import release_gradients
from model.dbem import MDCR, AxialDepthwise, ConvNormReLU, DecoderBlock, EncoderBlock
from model.fast import BF16_T_RTOL, is_deployed, optimize_for_inference
from model.ops import conv_from_one, conv_to_one
from model.reconstruction import Reconstruction

# Train-mode outputs in channels_last layout: PyTorch's channels_last BatchNorm sums the batch statistics less
# exactly than its NCHW kernel, hence a wider bound (benchmarks/README.md, "Precision of the fast forms").
CL_TRAIN_ATOL = 2.5e-4
# The deploy form against the model: max |difference| of B, T and D within FOLD_RTOL * max(1, max |value|), the
# float32 rounding of sums taken in another order (measured values in benchmarks/README.md).
FOLD_RTOL = 3e-5
FAST_KERNELS = pytest.mark.parametrize("fast_kernels", [False, True], ids=["plain", "fast-kernels"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _folding_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| on the scale of b: over max(1, max |b|)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic of ``module`` random (no trivially zero or one value)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


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


@pytest.mark.parametrize("first_stage", [True, False])
def test_bsgu_fast_kernels_equal_the_equations_border_included(first_stage):
    """The composed 5x5 gates with their border correction and tanh through sigmoid, values and gradients."""
    bsgu = _randomise(BSGU(8, first_stage=first_stage).double(), seed=4)
    torch.manual_seed(4)
    D, B, T = (torch.randn(2, 1, 9, 13, dtype=torch.double, requires_grad=True) for _ in range(3))
    c_prev = None if first_stage else torch.randn(2, 8, 9, 13, dtype=torch.double, requires_grad=True)
    inputs = [t for t in (D, B, T, c_prev) if t is not None] + list(bsgu.parameters())
    g_T, g_c = torch.randn(2, 1, 9, 13, dtype=torch.double), torch.randn(2, 8, 9, 13, dtype=torch.double)
    results = []
    for fast in (False, True):
        bsgu.fast_kernels = fast
        T_new, c = bsgu(D, B, T, c_prev)
        results.append([T_new, c, *torch.autograd.grad((T_new, c), inputs, (g_T, g_c))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-9)


# --- deploy forms ------------------------------------------------------------------------------------------------

def _block_cases():
    """(name, block, inputs) for every block class that has a deploy form."""
    torch.manual_seed(6)
    x16 = torch.randn(2, 16, 16, 24)
    return [
        ("axial", AxialDepthwise(16), (x16,)),
        ("encoder", EncoderBlock(16, 32), (x16,)),
        ("decoder", DecoderBlock(32, 16), (torch.randn(2, 32, 8, 12), x16)),
        ("conv-norm-relu", ConvNormReLU(16, 16, 3, dilation=2, groups=16), (x16,)),
        ("mdcr", MDCR(64), (torch.randn(2, 64, 4, 6),)),
        ("reconstruction", Reconstruction(8), (torch.randn(2, 1, 16, 24),)),
        ("bsgu-first", BSGU(8, first_stage=True), tuple(torch.randn(2, 1, 16, 24) for _ in range(3)) + (None,)),
        ("bsgu-later", BSGU(8, first_stage=False),
         tuple(torch.randn(2, 1, 16, 24) for _ in range(3)) + (torch.randn(2, 8, 16, 24),)),
    ]


@pytest.mark.parametrize("case", range(len(_block_cases())), ids=[c[0] for c in _block_cases()])
def test_each_deploy_form_computes_its_block(case, monkeypatch):
    monkeypatch.setattr(bsgu_module, "BAND_BYTES", 1)               # the BSGU's gates one row per band
    name, block, inputs = _block_cases()[case]
    block = _randomise(block, seed=case).eval()
    with torch.no_grad():
        expected = block(*inputs)
        deployed = copy.deepcopy(block)
        deployed.reparameterize()
        assert deployed.deployed
        got = deployed(*inputs)
        deployed.reparameterize()                                     # a second call changes nothing
        again = deployed(*inputs)
    expected, got, again = (out if isinstance(out, tuple) else (out,) for out in (expected, got, again))
    for e, g, a in zip(expected, got, again):
        assert g.shape == e.shape and torch.equal(g, a)
        assert (g.float() - e).abs().max() < 1e-5 * max(1.0, e.abs().max().item()), name


def test_bf16_reconstruction_keeps_its_input_exact():
    """B + T carries the logits into the reconstruction: its first convolution reads it in float32. With a first
    kernel that sums to zero, an offset of 1000 on the input cancels away from the zero-padded border, which it
    could not in bfloat16 (whose spacing at 1000 is 4)."""
    rec = _randomise(Reconstruction(8), seed=9).eval()
    with torch.no_grad():
        first = rec.body[0].weight
        first -= first.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.rand(1, 1, 32, 32)
        expected = rec(x)
        rec.reparameterize(bf16=True)
        near, offset = rec(x), rec(x + 1000.0)
    assert near.dtype == offset.dtype == torch.float32
    bound = BF16_T_RTOL * expected.abs().max()
    assert (near - expected).abs().max() < bound
    inside = (..., slice(4, -4), slice(4, -4))                      # four 3x3 convolutions from the border
    assert (offset - expected)[inside].abs().max() < bound


# --- inference ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"channels_last": False}, {"sub_batch": 2}])
def test_fast_inference_matches_reference(reference, options):
    model = from_release_state_dict(reference["state_dict"]).eval()
    fast = optimize_for_inference(model, **options)
    D, T = fast(reference["input"])
    assert D.dtype == T.dtype == torch.float32 and T.shape == reference["input"].shape
    assert (D - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T - reference["eval"]["T"]).abs().max() < EVAL_ATOL


@FAST_KERNELS
@pytest.mark.parametrize("stage_num, shape", [(1, (1, 1, 32, 32)), (2, (3, 1, 64, 96)), (3, (2, 1, 96, 64))])
def test_fast_inference_matches_the_model(stage_num, shape, fast_kernels):
    model = perturbed_model(stage_num, seed=stage_num).eval().set_fast_kernels(fast_kernels)
    x = torch.rand(shape)
    with torch.no_grad():
        D, T, stages = model(x, return_stages=True)
    for options in ({}, {"channels_last": False, "sub_batch": 2}):
        fast = optimize_for_inference(model, **options)
        D2, T2, stages2 = fast(x, return_stages=True)
        assert _folding_error(D2, D) < FOLD_RTOL and _folding_error(T2, T) < FOLD_RTOL
        assert len(stages2) == stage_num
        for a, b in zip(stages, stages2):
            for u, v in zip(a, b):
                assert u.shape == v.shape and _folding_error(v, u) < FOLD_RTOL
        assert torch.equal(fast(x)[1], T2)


def test_fast_bf16_within_its_bound_on_the_reference(reference):
    model = from_release_state_dict(reference["state_dict"]).eval()
    D, T = optimize_for_inference(model, bf16=True)(reference["input"])
    assert T.dtype == D.dtype == torch.float32
    T_ref = reference["eval"]["T"]
    error = (T - T_ref).abs().max().item()
    assert 0 < error < BF16_T_RTOL * T_ref.abs().max().item()    # bfloat16 does change the numbers, within the bound
    assert (D - reference["eval"]["D"]).abs().max() < BF16_T_RTOL * reference["eval"]["D"].abs().max()


@pytest.mark.parametrize("perturbed", [False, True])
def test_fast_bf16_within_its_bound_on_real_images(perturbed):
    cv2 = pytest.importorskip("cv2")
    folder = shared_path("data", "NUAA-SIRST", "test", "images")
    files = sorted(folder.glob("*.png"))[:2]
    assert files, f"no images in {folder}"
    images = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (128, 128)) for f in files]
    x = torch.stack([torch.from_numpy(i).float() / 255 for i in images]).unsqueeze(1)
    torch.manual_seed(5)
    model = (perturbed_model(5, seed=5) if perturbed else DCONet(DCONetConfig(stage_num=5))).eval()
    with torch.no_grad():
        _, T = model(x)
    _, T_bf16 = optimize_for_inference(model, bf16=True)(x)
    assert (T_bf16 - T).abs().max() < BF16_T_RTOL * T.abs().max()


def test_optimize_for_inference_copies_and_checks():
    model = perturbed_model(2).train().set_fast_kernels(True)
    before = copy.deepcopy(model.state_dict())
    fast = optimize_for_inference(model)
    assert is_deployed(fast) and not is_deployed(model)
    assert model.training and not fast.training             # the model is left as it was
    assert all(m.fast_kernels for m in model.modules() if hasattr(m, "fast_kernels"))
    assert not any(getattr(m, "deployed", False) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert fast.config == model.config
    with pytest.raises(ValueError, match="multiples of 32"):
        fast(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match="bf16"):
        optimize_for_inference(model, bf16=("bsgu",))
    with pytest.raises(ValueError, match="sub_batch"):
        optimize_for_inference(model, sub_batch=0)
    with pytest.raises(TypeError, match="DCONet"):
        optimize_for_inference(torch.nn.Conv2d(1, 1, 3))


# --- training ------------------------------------------------------------------------------------------------------

def _train_step(model: DCONet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    D, T = model(x)
    loss = reference_loss(D, T, x)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointing_keeps_loss_gradients_and_statistics():
    plain = perturbed_model(3).train()
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
    plain = _saved_bytes(perturbed_model(4).train(), x)
    recomputed = _saved_bytes(perturbed_model(4).train().set_checkpointing(True), x)
    assert recomputed < 0.5 * plain                          # about one stage of K = 4


def test_channels_last_can_be_switched_off_again():
    model = perturbed_model(1).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)[1]
        model.set_channels_last(True)
        assert model.stages[0].bsgu.conv_x(x).is_contiguous(memory_format=torch.channels_last)
        model.set_channels_last(False)
        assert model.stages[0].bsgu.conv_x(x).is_contiguous()
        assert torch.allclose(model(x)[1], expected, atol=EVAL_ATOL)


@FAST_KERNELS
@pytest.mark.parametrize("checkpointing, channels_last", [(True, False), (False, True), (True, True)])
def test_training_switches_match_reference(reference, checkpointing, channels_last, fast_kernels):
    model = from_release_state_dict(reference["state_dict"]).train()
    model.set_checkpointing(checkpointing).set_channels_last(channels_last).set_fast_kernels(fast_kernels)
    x = reference["input"]
    D, T = model(x)
    atol = CL_TRAIN_ATOL if channels_last else TRAIN_ATOL
    assert (D - reference["train"]["D"]).abs().max() < atol
    assert (T - reference["train"]["T"]).abs().max() < atol
    loss = reference_loss(D, T, x)
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
