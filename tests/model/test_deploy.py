"""The deploy form computes what the model computes: each block's deploy form (``reparameterize``), the walk that
finds the blocks by their declared capability, and ``deploy``'s DeployedDCONet (device, precision, sub-batches)."""
from __future__ import annotations

import copy

import pytest
import torch

import model.kernels as kernels_module
from conftest import EVAL_ATOL, perturbed_model, randomise, shared_path
from model import DCONet, DCONetConfig, HasKernels, Reparameterizable, from_release_state_dict
from model.bottleneck import MDCR, ConvNormReLU
from model.bsgu import BSGU
from model.dbem import AxialDepthwise, DecoderBlock, EncoderBlock
from model.deploy import BF16_T_RTOL, DeployedDCONet, deploy, is_deployed, reparameterize_blocks
from model.reconstruction import Reconstruction

# The deploy form against the model: max |difference| of B, T and D within FOLD_RTOL * max(1, max |value|), the
# float32 rounding of sums taken in another order (measured values in benchmarks/README.md).
FOLD_RTOL = 3e-5


def _folding_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| on the scale of b: over max(1, max |b|)."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


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
    monkeypatch.setattr(kernels_module, "BAND_BYTES", 1)               # the BSGU's gates one row per band
    name, block, inputs = _block_cases()[case]
    block = randomise(block, seed=case).eval()
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
    rec = randomise(Reconstruction(8), seed=9).eval()
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
def test_deployed_model_matches_reference(reference, options):
    model = from_release_state_dict(reference["state_dict"]).eval()
    deployed = deploy(model, **options)
    D, T = deployed(reference["input"])
    assert D.dtype == T.dtype == torch.float32 and T.shape == reference["input"].shape
    assert (D - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T - reference["eval"]["T"]).abs().max() < EVAL_ATOL


@pytest.mark.parametrize("stage_num, shape", [(1, (1, 1, 32, 32)), (2, (3, 1, 64, 96)), (3, (2, 1, 96, 64))])
def test_deployed_model_matches_the_model(stage_num, shape, kernels):
    model = perturbed_model(stage_num, seed=stage_num).eval().use_kernels(kernels)
    x = torch.rand(shape)
    with torch.no_grad():
        D, T, stages = model(x, return_stages=True)
    for options in ({}, {"channels_last": False, "sub_batch": 2}):
        deployed = deploy(model, **options)
        D2, T2, stages2 = deployed(x, return_stages=True)
        assert _folding_error(D2, D) < FOLD_RTOL and _folding_error(T2, T) < FOLD_RTOL
        assert len(stages2) == stage_num
        for a, b in zip(stages, stages2):
            for u, v in zip(a, b):
                assert u.shape == v.shape and _folding_error(v, u) < FOLD_RTOL
        assert torch.equal(deployed(x)[1], T2)


def test_deployed_bf16_within_its_bound_on_the_reference(reference):
    model = from_release_state_dict(reference["state_dict"]).eval()
    D, T = deploy(model, bf16=True)(reference["input"])
    assert T.dtype == D.dtype == torch.float32
    T_ref = reference["eval"]["T"]
    error = (T - T_ref).abs().max().item()
    assert 0 < error < BF16_T_RTOL * T_ref.abs().max().item()    # bfloat16 does change the numbers, within the bound
    assert (D - reference["eval"]["D"]).abs().max() < BF16_T_RTOL * reference["eval"]["D"].abs().max()


@pytest.mark.parametrize("perturbed", [False, True])
def test_deployed_bf16_within_its_bound_on_real_images(perturbed):
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
    _, T_bf16 = deploy(model, bf16=True)(x)
    assert (T_bf16 - T).abs().max() < BF16_T_RTOL * T.abs().max()


def test_deploy_copies_and_checks():
    model = perturbed_model(2).train().use_kernels(True)
    before = copy.deepcopy(model.state_dict())
    deployed = deploy(model)
    assert is_deployed(deployed) and not is_deployed(model)
    assert model.training and not deployed.training         # the model is left as it was
    assert all(m.kernels for m in model.modules() if isinstance(m, HasKernels))
    assert not any(getattr(m, "deployed", False) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert deployed.config == model.config
    with pytest.raises(ValueError, match="multiples of 32"):
        deployed(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match="bf16"):
        deploy(model, bf16=("bsgu",))
    with pytest.raises(ValueError, match="sub_batch"):
        deploy(model, sub_batch=0)
    with pytest.raises(TypeError, match="DCONet"):
        deploy(torch.nn.Conv2d(1, 1, 3))


@pytest.mark.parametrize("sub_batch", [None, 1, 2])
def test_sub_batch_is_decided_once_and_keeps_the_outputs(sub_batch):
    model = perturbed_model(1, seed=8).eval()
    deployed = deploy(model, device="cpu", sub_batch=sub_batch)
    assert deployed.sub_batch == (1 if sub_batch is None else sub_batch)    # None: one image at a time on the CPU
    calls = []
    deployed.run = lambda chunk, return_stages: calls.append(len(chunk)) or deployed.model(chunk, return_stages)
    x = torch.rand(3, 1, 32, 32)
    D, T = deployed(x)
    assert calls == {None: [1, 1, 1], 1: [1, 1, 1], 2: [2, 1]}[sub_batch]
    with torch.no_grad():
        assert _folding_error(T, model(x)[1]) < FOLD_RTOL


def test_plain_runs_the_models_own_forward_on_a_copy():
    model = perturbed_model(1, seed=9).train()
    plain = deploy(model, plain=True, bf16=False)
    assert isinstance(plain, DeployedDCONet) and plain.plain and plain.model is not model
    assert model.training and not plain.model.training and not plain.model.stages[0].bsgu.deployed
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert _folding_error(plain(x)[1], model.eval()(x)[1]) < FOLD_RTOL


# --- capabilities ------------------------------------------------------------------------------------------------

def test_every_block_with_a_deploy_form_declares_it():
    model = perturbed_model(2)
    declared = {type(m) for m in model.modules() if isinstance(m, Reparameterizable)}
    assert {AxialDepthwise, EncoderBlock, DecoderBlock, ConvNormReLU, MDCR, BSGU, Reconstruction} < declared
    deployed = deploy(model).model
    assert all(m.deployed for m in deployed.modules() if isinstance(m, Reparameterizable))


def test_a_block_that_does_not_declare_its_deploy_form_is_refused():
    """A module with a reparameterize method but without the base class would be skipped by an isinstance walk:
    deploy refuses it, naming the class."""

    class Undeclared(torch.nn.Module):
        def reparameterize(self, bf16: bool = False) -> None:
            self.deployed = True

    model = perturbed_model(1)
    model.stages[0].extra = Undeclared()
    with pytest.raises(TypeError, match="Undeclared.*Reparameterizable"):
        deploy(model)
    with pytest.raises(TypeError, match="defines no reparameterize"):
        type("NoForm", (Reparameterizable,), {})

    class Forgetful(Reparameterizable):
        def reparameterize(self, bf16: bool = False) -> None:
            pass

    with pytest.raises(RuntimeError, match="Forgetful"):
        reparameterize_blocks(Forgetful())


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_the_form_traced_for_export_computes_the_deploy_form(channels_last, monkeypatch):
    # While torch.export traces, the deploy forms run standard operators with shapes from the tensors (one band,
    # plain convolutions, sqrt(N) as a tensor); here that form runs eagerly and must give the deploy form's maps.
    net = deploy(perturbed_model(2, seed=4).eval(), channels_last=channels_last)
    x = torch.rand(3, 1, 96, 64)
    _, _, stages = net(x, return_stages=True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    _, _, stages_export = net(x, return_stages=True)
    for ours, theirs in zip(stages_export, stages):
        for a, b in zip(ours, theirs):
            assert _folding_error(a, b) < FOLD_RTOL
