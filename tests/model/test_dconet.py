"""DCONet against the release: reference vectors (the paper's forward and the speed kernels), shapes, input checks,
MDCR's loop semantics, the initialisation, and the training switches (channels_last, per-stage checkpointing)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import CL_TRAIN_ATOL, EVAL_ATOL, GRAD_RTOL, STATS_ATOL, TRAIN_ATOL, perturbed_model, reference_loss
from model import DCONet, DCONetConfig, from_release_state_dict, to_release_state_dict
from model.bottleneck import MDCR
from model.release import release_gradients


def test_release_parameter_count():
    model = DCONet()
    assert model.config == DCONetConfig(stage_num=5, channels=32)
    assert sum(p.numel() for p in model.parameters()) == 9_646_219   # the release's weights that reach an output
    assert sum(p.numel() for p in model.stages[0].parameters()) == 1_921_871
    assert sum(p.numel() for p in model.stages[1].parameters()) == 1_931_087


def test_eval_outputs_match_reference(reference, kernels):
    model = from_release_state_dict(reference["state_dict"]).eval().use_kernels(kernels)
    assert model.config.stage_num == reference["stage_num"] == 2
    with torch.no_grad():
        D, T = model(reference["input"])
    assert (D - reference["eval"]["D"]).abs().max() < EVAL_ATOL
    assert (T - reference["eval"]["T"]).abs().max() < EVAL_ATOL


def test_training_forward_and_running_stats_match_reference(reference, kernels):
    model = from_release_state_dict(reference["state_dict"]).train().use_kernels(kernels)
    with torch.no_grad():
        D, T = model(reference["input"])
    assert (D - reference["train"]["D"]).abs().max() < TRAIN_ATOL
    assert (T - reference["train"]["T"]).abs().max() < TRAIN_ATOL
    after = to_release_state_dict(model)
    expected = reference["train"]["state_dict_after"]
    live = [k for k in expected if ".lowrank.convs." not in k]   # the unused conv stack is not held here
    assert len(live) > 100
    for key in live:
        if key.endswith("num_batches_tracked"):
            assert after[key].item() == expected[key].item(), key   # 128 for MDCR's shared BN, 1 elsewhere
        else:
            assert torch.allclose(after[key], expected[key], rtol=0, atol=STATS_ATOL), key


def test_gradients_match_reference(reference, kernels):
    model = from_release_state_dict(reference["state_dict"]).train().use_kernels(kernels)
    x = reference["input"]
    D, T = model(x)
    loss = reference_loss(D, T, x)
    assert abs(loss.item() - reference["loss"].item()) < 1e-5
    loss.backward()
    grads = release_gradients(model)
    assert len(reference["grads"]) >= 12
    for key, expected in reference["grads"].items():
        error = ((grads[key] - expected).norm() / expected.norm()).item()
        assert error < GRAD_RTOL, f"{key}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("stage_num, shape", [(1, (1, 1, 32, 32)), (2, (3, 1, 64, 96)), (3, (2, 1, 96, 64))])
def test_output_shapes_and_stages(stage_num, shape):
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=stage_num)).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        D, T, stages = model(x, return_stages=True)
        D2, T2 = model(x)
    assert D.shape == T.shape == x.shape
    assert len(stages) == stage_num
    for out in stages:
        assert out.B.shape == out.T.shape == out.D.shape == x.shape
    assert torch.equal(stages[-1].T, T) and torch.equal(stages[-1].D, D)
    assert torch.equal(T, T2) and torch.equal(D, D2)
    assert torch.isfinite(T).all() and torch.isfinite(D).all()


def test_batch_items_are_independent_in_eval_mode():
    torch.manual_seed(1)
    model = DCONet(DCONetConfig(stage_num=2)).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        _, T_batch = model(x)
        _, T_one = model(x[1:2])
    assert torch.allclose(T_batch[1:2], T_one, atol=1e-5)


@pytest.mark.parametrize("shape, words", [
    ((1, 1, 33, 64), ["33x64", "multiples of 32", "pad"]),
    ((1, 1, 64, 250), ["64x250", "resize"]),
    ((1, 64, 64), ["4-D", "(N, 1, H, W)"]),
    ((1, 3, 64, 64), ["grayscale", "3 channels"]),
])
def test_bad_input_is_refused_with_a_useful_message(shape, words):
    model = DCONet(DCONetConfig(stage_num=1)).eval()
    with pytest.raises(ValueError) as info:
        model(torch.rand(shape))
    for word in words:
        assert word in str(info.value)


def _mdcr_as_released(mdcr: MDCR, x: torch.Tensor) -> torch.Tensor:
    """The release's formulation: the shared 4->4 block called once per channel index, in a Python loop."""
    chunks = torch.chunk(x, 4, dim=1)
    ys = [branch(c) for branch, c in zip(mdcr.branches, chunks)]
    outs = [mdcr.mix(torch.cat([y[:, i:i + 1] for y in ys], dim=1)) for i in range(ys[0].shape[1])]
    return mdcr.out(torch.cat(outs, dim=1))


@pytest.mark.parametrize("training", [True, False])
def test_vectorised_mdcr_keeps_the_loop_semantics(training):
    torch.manual_seed(2)
    vectorised = MDCR(64)
    with torch.no_grad():   # make the shared BN's statistics non-trivial
        vectorised.mix.norm.running_mean.uniform_(-0.5, 0.5)
        vectorised.mix.norm.running_var.uniform_(0.5, 1.5)
        vectorised.mix.conv.bias.uniform_(-0.5, 0.5)
    loop = copy.deepcopy(vectorised)
    vectorised.train(training), loop.train(training)
    x = torch.randn(3, 64, 4, 6, requires_grad=True)
    x_loop = x.detach().clone().requires_grad_(True)
    y_vectorised, y_loop = vectorised(x), _mdcr_as_released(loop, x_loop)
    assert torch.allclose(y_vectorised, y_loop, atol=1e-5)
    for a, b in zip(vectorised.state_dict().values(), loop.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)
    if training:
        assert vectorised.mix.norm.num_batches_tracked.item() == 16
        y_vectorised.square().sum().backward()
        y_loop.square().sum().backward()
        assert torch.allclose(x.grad, x_loop.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(vectorised.mix.conv.weight.grad, loop.mix.conv.weight.grad, rtol=1e-4, atol=1e-5)


def test_initialisation_follows_the_release():
    torch.manual_seed(3)
    model = DCONet(DCONetConfig(stage_num=2))
    first, second = model.stages[0].bsgu, model.stages[1].bsgu
    assert torch.all(first.epsilon == 0.01) and torch.all(first.cell_bias == 0)
    gates = (first.conv_f, first.conv_i, first.conv_o, first.conv_g)
    for conv in (first.conv_x, *gates, first.conv_out, second.conv_c):
        assert torch.all(conv.bias == 0)
    std = (2.0 / (32 * 9 + 32 * 9)) ** 0.5                             # each gate a 32->32 xavier-normal conv
    for conv in gates:
        assert abs(conv.weight.std().item() - std) < 0.1 * std
    norm = model.stages[0].reconstruction.body[1]
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    conv_in = model.stages[0].dbem.conv_in.weight                       # (16, 1, 7, 7): fan_in 49, fan_out 784
    assert abs(conv_in.std().item() - (2.0 / (49 + 784)) ** 0.5) < 0.15 * (2.0 / (49 + 784)) ** 0.5


def test_bsgu_initialisation_draws_in_the_projects_order():
    """A seed gives the same network in every version of this project: the BSGU draws its xavier-normal weights
    as it always has (conv_x, conv_out, conv_c, then the gates f, i, o, g). Reordering them trains another run."""
    from model.bsgu import BSGU
    bsgu = BSGU(channels=8, first_stage=False)
    torch.manual_seed(7)
    bsgu.reset_parameters()
    torch.manual_seed(7)
    for conv in (bsgu.conv_x, bsgu.conv_out, bsgu.conv_c, bsgu.conv_f, bsgu.conv_i, bsgu.conv_o, bsgu.conv_g):
        expected = torch.nn.init.xavier_normal_(torch.empty_like(conv.weight))
        assert torch.equal(conv.weight, expected)
        assert not conv.bias.any()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


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


@pytest.mark.parametrize("checkpointing, channels_last", [(True, False), (False, True), (True, True)])
def test_training_switches_match_reference(reference, checkpointing, channels_last, kernels):
    model = from_release_state_dict(reference["state_dict"]).train()
    model.set_checkpointing(checkpointing).set_channels_last(channels_last).use_kernels(kernels)
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
