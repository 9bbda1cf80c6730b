"""Learned registration networks: a compact VoxelMorph U-Net and network + NADMM refinement.

:class:`VoxelMorph` is a compact implementation of the standard VoxelMorph architecture
(Balakrishnan et al., "An unsupervised learning model for deformable
medical image registration", CVPR 2018 / IEEE TMI 2019), default = **VoxelMorph-1**: the
moving and fixed images concatenated as 2 channels; encoder of 3×3(×3) convolutions with
stride 2 and 16, 32, 32, 32 features; decoder of 32, 32, 32, 32 features, each followed by ×2
nearest upsampling and concatenation with the encoder feature map of that scale; two more
convolutions of 8 features at full resolution; LeakyReLU(0.2) after every convolution; a final
3×3 convolution to ``ndim`` channels initialised from N(0, 1e-5²) with zero bias (so training
starts near the identity). ``dec_features=(32, 32, 32, 32, 32, 16, 16)`` gives VoxelMorph-2.
Optional scaling-and-squaring integration (``integration_steps > 0``) turns the output into a
stationary velocity field whose exponential is the displacement (the diffeomorphic variant).
It is kept beside MONAI's ``VoxelMorph`` because it needs no extra dependency, takes any
spatial size (it pads internally) and has the ``(fixed, moving, spacing)`` signature of
:class:`NetworkWithNADMM`. :class:`MonaiNetwork` gives any MONAI registration network
(``net(moving, fixed) -> (warped, ddf)``) that signature: MONAI's ``ddf`` is in this package's
displacement convention (voxel units, component ``i`` along axis ``i``, pull-back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.warp import compose  # unchecked: runs inside the forward pass of a network

__all__ = ["VoxelMorph", "MonaiNetwork", "NetworkWithNADMM", "integrate_velocity"]


def integrate_velocity(velocity: Tensor, steps: int) -> Tensor:
    """Scaling and squaring: ``exp(v)`` as a displacement.

    Args:
        velocity: ``(B, ndim, *S)`` stationary velocity, voxel units.
        steps: number of squarings ``N``; ``d = v / 2^N`` composed with itself ``N`` times.

    Returns:
        ``(B, ndim, *S)`` displacement, voxel units, pull-back.
    """
    d = velocity / (2**steps)
    for _ in range(steps):
        d = compose(d, d)  # d ∘ d: x ↦ d(x) + d(x + d(x))
    return d


class _ConvBlock(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv = conv(cin, cout, 3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class VoxelMorph(nn.Module):
    """VoxelMorph U-Net (this package's implementation; see the module docstring).

    Args:
        ndim: 2 or 3.
        enc_features: encoder widths, each a stride-2 convolution (default VoxelMorph-1).
        dec_features: decoder widths: the first ``len(enc_features)`` are followed by
            upsampling + skip concatenation, the rest run at full resolution.
        integration_steps: 0 (the output is the displacement, as VoxelMorph-1) or ``N`` > 0
            (the output is a velocity integrated by ``N`` squarings: diffeomorphic).

    Shapes:
        ``forward(fixed (B, 1, *S), moving (B, 1, *S), spacing=None)`` → displacement
        ``(B, ndim, *S)`` in voxel units, pull-back (``moving(x + d(x))`` ≈ ``fixed(x)``).
        Any ``S`` works: inputs are padded (replicate) to a multiple of
        ``2 ** len(enc_features)`` and the output cropped back. ``spacing`` is accepted for a
        common model signature and ignored (the network works in voxels).
    """

    def __init__(
        self,
        ndim: int = 2,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 8, 8),
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim: expected 2 or 3, got {ndim}")
        if len(dec_features) < len(enc_features):
            raise ValueError("dec_features: need at least one entry per encoder level")
        if integration_steps < 0:
            raise ValueError(f"integration_steps: expected >= 0, got {integration_steps}")
        self.ndim = ndim
        self.integration_steps = integration_steps
        self.levels = len(enc_features)
        self.encoder = nn.ModuleList()
        cin, skips = 2, [2]
        for c in enc_features:
            self.encoder.append(_ConvBlock(ndim, cin, c, stride=2))
            cin = c
            skips.append(c)
        skips.pop()  # the deepest map is the decoder's input, not a skip
        self.decoder = nn.ModuleList()
        for c in dec_features[: self.levels]:
            self.decoder.append(_ConvBlock(ndim, cin, c))
            cin = c + skips.pop()
        self.extra = nn.ModuleList()
        for c in dec_features[self.levels :]:
            self.extra.append(_ConvBlock(ndim, cin, c))
            cin = c
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.flow = conv(cin, ndim, 3, padding=1)
        # Start near the identity, as VoxelMorph does.
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, fixed: Tensor, moving: Tensor, spacing=None) -> Tensor:
        if fixed.shape != moving.shape or fixed.dim() != self.ndim + 2 or fixed.shape[1] != 1:
            raise ValueError(
                f"fixed/moving: expected two (B, 1, *S) images with {self.ndim} spatial axes, "
                f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
            )
        shape = fixed.shape[2:]
        x = _pad_to_multiple(torch.cat([moving, fixed], dim=1), 2**self.levels)
        feats = [x]
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        feats.pop()
        for block in self.decoder:
            x = block(x)
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, feats.pop()], dim=1)
        for block in self.extra:
            x = block(x)
        flow = self.flow(x)
        flow = flow[(slice(None), slice(None), *(slice(0, n) for n in shape))]
        if self.integration_steps:
            flow = integrate_velocity(flow, self.integration_steps)
        return flow


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Replicate-pad the spatial axes of ``(B, C, *S)`` up to multiples of ``multiple``."""
    pad = []
    for n in reversed(x.shape[2:]):  # F.pad wants the last axis first
        pad += [0, (-n) % multiple]
    return F.pad(x, pad, mode="replicate") if any(pad) else x


class MonaiNetwork(nn.Module):
    """A MONAI registration network (``net(moving, fixed) -> (warped, ddf)``, e.g.
    ``monai.networks.nets.VoxelMorph``) with the ``(fixed, moving, spacing)`` signature.

    Inputs are replicate-padded to multiples of ``multiple`` (the network's total downsampling)
    and the ``ddf`` cropped back. Shapes: ``forward(fixed (B, 1, *S), moving (B, 1, *S),
    spacing=None)`` → ``(B, ndim, *S)`` voxel units, pull-back; ``spacing`` is ignored.
    """

    def __init__(self, network: nn.Module, multiple: int = 16) -> None:
        super().__init__()
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ValueError(f"multiple: expected a positive integer, got {multiple!r}")
        self.network = network
        self.multiple = multiple

    def forward(self, fixed: Tensor, moving: Tensor, spacing=None) -> Tensor:
        shape = fixed.shape[2:]
        out = self.network(_pad_to_multiple(moving, self.multiple),
                           _pad_to_multiple(fixed, self.multiple))
        ddf = out[1] if isinstance(out, (tuple, list)) else out
        return ddf[(slice(None), slice(None), *(slice(0, n) for n in shape))]


class NetworkWithNADMM(nn.Module):
    """A network's displacement refined by an (unrolled, differentiable) NADMM layer.

    ``d = layer(fixed, moving, spacing, initial_displacement=network(fixed, moving, spacing))``:
    the layer's output is the final displacement, and gradients flow through the layer into
    the network (end-to-end training). With ``network`` frozen / in eval mode this is
    test-time refinement of the network's prediction.

    Shapes: ``forward(fixed (B, 1, *S), moving (B, 1, *S), spacing=None)`` → ``(B, ndim, *S)``
    voxel units. ``return_initial=True`` also returns the network's displacement.
    """

    def __init__(self, network: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.layer = layer

    def forward(
        self, fixed: Tensor, moving: Tensor, spacing=None, return_initial: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        d0 = self.network(fixed, moving, spacing)
        d = self.layer(fixed, moving, spacing, initial_displacement=d0)
        return (d, d0) if return_initial else d
