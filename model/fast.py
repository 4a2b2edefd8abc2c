"""Inference-only DCONet: the function of ``DCONet`` in eval mode, computed with less work and memory traffic.

``optimize_for_inference(model)`` returns a module whose ``forward(x)`` gives the (D, T) of ``model.eval()(x)``
and whose ``forward(x, return_stages=True)`` gives the per-stage outputs too. Only the way the numbers are
computed changes:

- every BatchNorm is folded into the convolution in front of it (in eval mode it is a fixed affine map);
  each encoder's axial block A(x) = x + dw7x1(x) + dw1x7(x) and the BatchNorm after it become one depthwise
  7x7 convolution with a cross-shaped kernel; the BSGU's epsilon is folded into conv_out;
- the BSGU's gates(conv_x(x)) is one 5x5 convolution of the one-channel x (see ``model.bsgu``); it runs in
  bands of rows, each band's gate tensor going through the gating arithmetic while it is in cache, so the
  full-resolution 4C-channel gate tensor is never formed; tanh(u) is computed as 2 sigmoid(2u) - 1;
- the decoders mix the wide low-resolution input before upsampling (see ``DecoderBlock``); 1x1 convolutions
  in channels_last layout are single matrix products; the one-output convolutions run as in ``model.ops``;
- in eval mode every image is independent, so a batch runs in sub-batches (``sub_batch``; one image at a time
  on the CPU by default), which keeps the working set of the full-resolution layers near the caches;
- optional: bfloat16 arithmetic for the BSGU and the reconstruction (``bf16=True``, see ``BF16_PARTS`` and
  ``BF16_T_RTOL``), ``torch.compile``.

In float32 the outputs equal the model's to rounding (about 1e-6, tests/test_fast.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .bsgu import compose_gate_kernel, gate_border
from .dconet import DCONet, StageOutput
from .ops import conv_to_one_float, is_nhwc, nhwc_weight

# bf16=True runs these parts in bfloat16 (the reconstruction's first convolution excepted, see _FLOAT32_ALWAYS).
# max |T_bf16 - T_fp32| / max |T_fp32|, measured: 0.0024 on the reference input and weights; 0.0020 and 0.0054 on
# two real 128x128 images with a release-initialised and a perturbed K = 5 model (logits up to 42); 0.0023 and
# 0.0033 on the 86 NUAA-SIRST test images at 128x128 and 256x256 with trained K = 2 weights, where the test mIoU
# moved by less than 0.08 points (benchmarks/precision_check.py). The DBEM in bfloat16 would add several times
# more error (its output B enters T = D - B + ... directly) for no speed to speak of.
BF16_PARTS = ("bsgu", "reconstruction")
BF16_T_RTOL = 0.02          # the bound the tests hold bf16=True to: max |dT| < BF16_T_RTOL * max |T|
# buffer-name prefixes of each part; the DBEM's bottleneck (mdcr_*, the attention) always stays float32
_PART_PREFIXES = {"dbem": ("conv_in", "enc", "dec", "conv_out"), "bsgu": ("bsgu_",), "reconstruction": ("rec",)}
# Buffers that stay float32 inside a bfloat16 part: the reconstruction's first convolution (one input channel,
# little work) reads B + T, which carries the logits; rounding it to bfloat16 would put an error of up to
# |B + T| * 2**-9 into D and through D into the next stage's T.
_FLOAT32_ALWAYS = ("rec0_",)
BAND_BYTES = 4 << 20        # CPU: rows per band of the BSGU gates chosen so that a band holds about this much


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d | None = None,
            in_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by eval-mode BatchNorm, computed in float64, returned as float32.

    ``in_scale`` multiplies the input channels (a per-channel factor in front of the convolution)."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if in_scale is not None:
        weight = weight * in_scale.detach().double().view(1, -1, 1, 1)
    if norm is not None:
        scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.detach().double()
    return weight.float(), bias.float()


def _folded_axial(axial, norm: nn.BatchNorm2d | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, 1, k, k), bias) of norm(A(x)) as one depthwise convolution."""
    weight, bias = axial.cross_kernel()
    conv = nn.Conv2d(weight.shape[0], weight.shape[0], weight.shape[-1], groups=weight.shape[0])
    conv.weight.data, conv.bias.data = weight.detach(), bias.detach()
    return _folded(conv, norm)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution; in channels_last layout one (N*H*W, Cin) @ (Cin, Cout) matrix product."""
    if not is_nhwc(x):
        return F.conv2d(x, weight, bias)
    n, cin, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, cin)                    # (N, Cin, H, W) -> (N*H*W, Cin), a view
    w2 = weight.view(weight.shape[0], cin).t()                        # (Cin, Cout)
    y = torch.mm(rows, w2) if bias is None else torch.addmm(bias, rows, w2)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)                    # (N*H*W, Cout) -> (N, Cout, H, W), NHWC


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """max_pool2d(x, 2) as the maximum of the four phases (the same values, NaN included)."""
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


class _Weights(nn.Module):
    """Folded weights and biases, kept as buffers so that ``.to(device)`` moves them."""

    def add(self, name: str, weight_bias: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.register_buffer(f"{name}_w", weight_bias[0])
        self.register_buffer(f"{name}_b", weight_bias[1])

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_w")

    def b(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_b")


class FastStage(nn.Module):
    """One eval-mode stage with folded weights: B = DBEM(D - T); T, c = BSGU(D, B, T, c); D = M(B + T)."""

    def __init__(self, stage):
        super().__init__()
        dbem, bsgu, recon = stage.dbem, stage.bsgu, stage.reconstruction
        p = self.p = _Weights()
        # DBEM
        p.add("conv_in", _folded(dbem.conv_in))
        self.depth = len(dbem.encoders)
        for i, enc in enumerate(dbem.encoders):
            p.add(f"enc{i}_axial", _folded_axial(enc.axial, enc.norm))         # BN(A(x)): one depthwise 7x7
            p.add(f"enc{i}_proj", _folded(enc.proj))
        mdcr = dbem.mdcr
        self.mdcr_groups = mdcr.groups
        self.mdcr_rates = tuple(b.conv.dilation[0] for b in mdcr.branches)
        for j, branch in enumerate(mdcr.branches):
            p.add(f"mdcr_branch{j}", _folded(branch.conv, branch.norm))
        w, b = _folded(mdcr.mix.conv, mdcr.mix.norm)                            # shared by all channel groups
        p.add("mdcr_mix", (w.repeat(mdcr.groups, 1, 1, 1), b.repeat(mdcr.groups)))
        p.add("mdcr_out", _folded(mdcr.out.conv, mdcr.out.norm))
        self.soa = copy.deepcopy(dbem.soa).requires_grad_(False)
        for i, dec in enumerate(dbem.decoders):
            w, b = _folded(dec.proj_in, dec.norm)                               # BN(proj_in(.))
            p.add(f"dec{i}_low", (w[:, :dec.in_channels].contiguous(), None))    # columns of the upsampled input
            p.add(f"dec{i}_skip", (w[:, dec.in_channels:].contiguous(), b))     # columns of the skip
            p.add(f"dec{i}_axial", _folded_axial(dec.axial))
            p.add(f"dec{i}_proj", _folded(dec.proj_out))
        p.add("conv_out", _folded(dbem.conv_out))
        # BSGU. tanh(u) = 2 sigmoid(2u) - 1 (sigmoid is several times cheaper than tanh on CPUs): the rows of the
        # cell candidate are doubled, so that one sigmoid covers all four gates, and conv_out takes 2 * eps.
        self.first_stage = bsgu.first_stage
        self.channels = C = bsgu.channels
        wx, bx = _folded(bsgu.conv_x)
        wg, bg = _folded(bsgu.gates)
        double = torch.ones(4 * C)
        double[3 * C:] = 2.0                                                    # the "cell" block (GATES order)
        wg, bg = wg * double.view(-1, 1, 1, 1), bg * double
        p.add("bsgu_x", (wx, bx))                                               # for the border ring
        p.add("bsgu_gates", (wg, bg))
        w5, b5 = compose_gate_kernel(wx.double(), bx.double(), wg.double(), bg.double())
        p.add("bsgu_gates5", (w5.float(), b5.float()))                          # gates(conv_x(x)), one 5x5 conv
        if bsgu.first_stage:
            p.add("bsgu_cell", (bsgu.cell_bias.detach().clone().view(1, -1, 1, 1), None))   # c0 = conv_c(0)
        else:
            p.add("bsgu_c", _folded(bsgu.conv_c))
        p.add("bsgu_out", _folded(bsgu.conv_out, in_scale=2.0 * bsgu.epsilon))
        # Reconstruction: (conv, BN, ReLU) x 3, conv
        convs = [m for m in recon.body if isinstance(m, nn.Conv2d)]
        norms = [m for m in recon.body if isinstance(m, nn.BatchNorm2d)]
        self.rec_layers = len(convs)
        for j, conv in enumerate(convs):
            p.add(f"rec{j}", _folded(conv, norms[j] if j < len(norms) else None))

    def _conv(self, x: torch.Tensor, name: str, **kw) -> torch.Tensor:
        return F.conv2d(x, self.p.w(name), self.p.b(name), **kw)

    def _conv1x1(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return conv1x1(x, self.p.w(name), self.p.b(name))

    # --- DBEM ------------------------------------------------------------------------------------------------
    def _mdcr(self, x: torch.Tensor) -> torch.Tensor:
        g = self.mdcr_groups
        chunks = torch.chunk(x, len(self.mdcr_rates), dim=1)
        ys = [self._conv(c, f"mdcr_branch{j}", padding=r, dilation=r, groups=g).relu_()
              for j, (c, r) in enumerate(zip(chunks, self.mdcr_rates))]         # 4 x (N, G, h, w)
        n, _, h, w = x.shape
        x = torch.stack(ys, dim=2).reshape(n, -1, h, w)                          # (N, G, 4, h, w) -> (N, 4G, h, w)
        x = self._conv(x, "mdcr_mix", groups=g).relu_()
        return self._conv(x, "mdcr_out").relu_()

    def dbem(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv(x, "conv_in", padding=3)                                  # (N, 16, H, W)
        skips = []
        for i in range(self.depth):
            skip = self._conv(x, f"enc{i}_axial", padding=3, groups=x.shape[1])   # BN(A(x))
            skips.append(skip)
            x = F.gelu(max_pool2x2(self._conv1x1(skip, f"enc{i}_proj")))          # (N, 2C, H/2, W/2)
        x = self.soa(self._mdcr(x.float())).to(skips[0].dtype)                     # bottleneck, in float32
        for i, skip in enumerate(reversed(skips)):
            low = self._conv1x1(x, f"dec{i}_low")                                 # (N, Cout, h, w)
            x = self._conv1x1(skip, f"dec{i}_skip")                               # (N, Cout, 2h, 2w)
            x += F.interpolate(low, scale_factor=2.0, mode="nearest")             # BN(proj_in(cat[up(x), skip]))
            x = self._conv(x, f"dec{i}_axial", padding=3, groups=x.shape[1])      # A(.)
            x = F.gelu(self._conv1x1(x, f"dec{i}_proj"))
        return self._conv1x1(x, "conv_out")                                      # (N, 1, H, W)

    # --- BSGU and reconstruction -----------------------------------------------------------------------------
    def bsgu(self, D: torch.Tensor, B: torch.Tensor, T: torch.Tensor,
             c_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        p, C = self.p, self.channels
        x = D - B + T                                                            # (N, 1, H, W), float32
        xd = x.to(p.bsgu_gates5_w.dtype)
        n, _, H, W = x.shape
        top, bottom, left, right = gate_border(xd, p.bsgu_x_w, p.bsgu_x_b, p.bsgu_gates_w, p.bsgu_gates_b)
        c0 = p.bsgu_cell_w if self.first_stage else self._conv(c_prev, "bsgu_c", padding=1)   # (N, C, H, W)
        layout = torch.channels_last if p.bsgu_gates5_w.stride()[1] == 1 else torch.contiguous_format
        c = torch.empty(n, C, H, W, dtype=xd.dtype, device=x.device, memory_format=layout)
        h = torch.empty_like(c)
        rows = H if x.device.type != "cpu" else max(1, BAND_BYTES // (4 * C * W * xd.element_size() * n))
        xp = F.pad(xd, (0, 0, 2, 2))                                             # the 5x5's zero rows
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            z = F.conv2d(xp[:, :, r0:r1 + 4], p.bsgu_gates5_w, p.bsgu_gates5_b, padding=(0, 2))  # (N, 4C, r, W)
            if r0 == 0:
                z[:, :, :1] = top                                                # the exact border ring
            if r1 == H:
                z[:, :, -1:] = bottom
            z[:, :, :, :1], z[:, :, :, -1:] = left[:, :, r0:r1], right[:, :, r0:r1]
            f, i, o, s = z.sigmoid_().split(C, dim=1)                            # s = sigmoid(2 g)
            cb, hb = c[:, :, r0:r1], h[:, :, r0:r1]
            torch.mul(f, c0 if self.first_stage else c0[:, :, r0:r1], out=cb)   # f * c0
            cb.addcmul_(i, s.sub_(0.5), value=2.0)                               # + i * tanh(g), tanh(g) = 2 (s - 1/2)
            torch.mul(cb, 2.0, out=hb).sigmoid_().sub_(0.5).mul_(o)              # o * tanh(c) / 2
        T = x - conv_to_one_float(h, p.bsgu_out_w, p.bsgu_out_b)                 # x - conv_out(o tanh(c) eps)
        return T, c

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        for j in range(self.rec_layers - 1):                                    # each layer in its weights' dtype
            x = self._conv(x.to(self.p.w(f"rec{j}").dtype), f"rec{j}", padding=1).relu_()
        last = f"rec{self.rec_layers - 1}"
        return conv_to_one_float(x.to(self.p.w(last).dtype), self.p.w(last), self.p.b(last))

    def forward(self, D: torch.Tensor, T: torch.Tensor,
                c: torch.Tensor | None) -> tuple[StageOutput, torch.Tensor]:
        # each part computes in the dtype its weights are stored in; B, T and D stay float32
        p = self.p
        B = self.dbem((D - T).to(p.conv_in_w.dtype)).float()
        T, c = self.bsgu(D, B, T, c)
        D = self.reconstruction(B + T).float()
        return StageOutput(B, T, D), c


class FastDCONet(nn.Module):
    """An inference-only DCONet built by ``optimize_for_inference``; forward as ``DCONet.forward``."""

    def __init__(self, model: DCONet, bf16: bool | tuple[str, ...] = False, channels_last: bool = True,
                 sub_batch: int | None = None):
        super().__init__()
        self.config = model.config
        self.stages = nn.ModuleList(FastStage(stage) for stage in model.stages)
        parts = BF16_PARTS if bf16 is True else tuple(bf16 or ())
        unknown = sorted(set(parts) - set(_PART_PREFIXES))
        if unknown:
            raise ValueError(f"bf16 parts {unknown} unknown; choose among {sorted(_PART_PREFIXES)}")
        self.bf16_parts = parts
        self.channels_last = channels_last
        self.sub_batch = sub_batch
        for stage in self.stages:
            for name, buf in list(stage.p.named_buffers()):
                if (any(name.startswith(prefix) for part in parts for prefix in _PART_PREFIXES[part])
                        and not name.startswith(_FLOAT32_ALWAYS)):
                    buf = buf.to(torch.bfloat16)
                if channels_last and buf.dim() == 4:
                    buf = nhwc_weight(buf)
                setattr(stage.p, name, buf)
        self.run_chunk = self._run_chunk

    def _run_chunk(self, x: torch.Tensor, return_stages: bool):
        D, T, c = x, torch.zeros_like(x), None
        outs = []
        for stage in self.stages:
            out, c = stage(D, T, c)
            D, T = out.D, out.T
            if return_stages:
                outs.append(out)
        return D, T, outs

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        DCONet.check_input(x)
        step = self.sub_batch or (1 if x.device.type == "cpu" else x.shape[0])
        with torch.no_grad():
            parts = [self.run_chunk(chunk, return_stages) for chunk in x.float().split(step)]
        D = torch.cat([p[0] for p in parts])
        T = torch.cat([p[1] for p in parts])
        if not return_stages:
            return D, T
        stages = [StageOutput(*(torch.cat([p[2][k][j] for p in parts]) for j in range(3)))
                  for k in range(len(self.stages))]
        return D, T, stages


def optimize_for_inference(model: DCONet, bf16: bool | tuple[str, ...] = False, channels_last: bool = True,
                           compile: bool = False, sub_batch: int | None = None) -> FastDCONet:
    """An inference-only copy of ``model`` with the same forward API and, in float32, the same outputs.

    Args:
        model: a DCONet (also wrapped by DistributedDataParallel or torch.compile). Its weights and BatchNorm
            running statistics are copied as they are now; the model itself is left as it was.
        bf16: True runs ``BF16_PARTS`` in bfloat16 (1.2-1.6x faster at batch 8 on CPUs with AVX512-BF16);
            T then differs from float32 by less than ``BF16_T_RTOL * max |T|``. A tuple names the parts
            explicitly (any of "dbem", "bsgu", "reconstruction"; ("bsgu",) alone: 1e-4 to 1.2e-3 of max |T| measured).
        channels_last: activations in (N, H, W, C) layout, the native one of oneDNN and cuDNN.
        compile: ``torch.compile`` the stage loop (the first call of each input shape compiles, for minutes).
        sub_batch: images per chunk of the batch; None: one at a time on the CPU, the whole batch on a GPU.
    """
    model = getattr(model, "_orig_mod", model)    # unwrap torch.compile
    model = getattr(model, "module", model)       # unwrap DistributedDataParallel
    if not isinstance(model, DCONet):
        raise TypeError(f"optimize_for_inference expects a DCONet, got {type(model).__name__}")
    if sub_batch is not None and sub_batch < 1:
        raise ValueError(f"sub_batch must be a positive number of images or None, got {sub_batch}")
    was_training = model.training
    model.eval()
    try:
        fast = FastDCONet(model, bf16=bf16, channels_last=channels_last, sub_batch=sub_batch)
    finally:
        model.train(was_training)
    fast = fast.to(next(model.parameters()).device).eval()
    if compile:
        fast.run_chunk = torch.compile(fast._run_chunk, dynamic=False)
    return fast
