"""What a block offers besides its paper forward, declared by inheritance (never discovered by hasattr).

- ``Reparameterizable``: a deploy form for inference, switched to by ``reparameterize`` (``model.deploy``).
- ``HasKernels``: training-time speed kernels, switched by ``DCONet.use_kernels``.
- ``HasLayout``: a forward that writes its activations in (N, H, W, C) layout, switched by
  ``DCONet.set_channels_last``.
"""
from __future__ import annotations

from torch import nn


class Reparameterizable(nn.Module):
    """A block with a deploy form: an equivalent computation for inference (eval mode, no autograd), as in
    RepVGG's and MobileOne's re-parameterisation. The block keeps its training form as its forward until
    ``reparameterize`` switches it, once and for good.

    A subclass defines ``reparameterize(bf16=False)``, which sets ``deployed``; a second call changes nothing.
    ``bf16_capable = True`` declares that the deploy form can store its weights, and so compute, in bfloat16;
    the deploy walk (``model.deploy``) passes ``bf16=True`` only to such blocks.
    """

    deployed: bool = False
    bf16_capable: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.reparameterize is Reparameterizable.reparameterize:
            raise TypeError(f"{cls.__name__} inherits Reparameterizable but defines no reparameterize(bf16=False)")

    def reparameterize(self, bf16: bool = False) -> None:
        """Switch to the deploy form (in place). ``bf16``: only for a block with ``bf16_capable``."""
        raise NotImplementedError


class HasKernels:
    """A block with training-time speed kernels (hand-written convolutions and backward passes, ``model.ops``
    and ``model.kernels``): the same function to float rounding, used while ``kernels`` is True."""

    kernels: bool = False


class HasLayout:
    """A block that writes its activations in (N, H, W, C) layout (channels_last) while ``nhwc`` is True."""

    nhwc: bool = False
