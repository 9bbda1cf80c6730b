"""Modality-independent image features for the data term: MIND-SSC.

A pair whose intensities do not correspond (T1 against T2, CT against MRI, an inverted or
non-monotone contrast) defeats a data term on intensities. MIND-SSC (Heinrich et al., "Towards
realtime multimodal fusion for image-guided interventions using self-similarities", MICCAI
2013) describes each voxel by how similar the patches around pairs of its neighbours are to
each other, normalised by the local patch variance: that local self-similarity is shared by
modalities that image the same structures, so the descriptors of the two images can be
compared with a plain sum of squared differences (the multi-channel l2 data term).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_image_layout, check_int

FEATURES = ("none", "mind")
# Bounds of the local variance estimate relative to its mean over the image (the reference
# implementation's), so flat regions (variance → 0) do not blow the descriptor up.
VARIANCE_CLAMP = (1e-3, 1e3)
# Channel order of the reference implementation (that of the authors' C++ code), applied to
# the neighbour pairs enumerated as in :func:`_neighbour_pairs`.
_REFERENCE_ORDER = {2: (2, 0, 1, 3), 3: (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)}


def _neighbour_pairs(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The self-similarity context: pairs of face neighbours (offsets ``±e_k``) at distance
    √2 (on different axes), enumerated as the reference does (``(n_i, n_j)``, ``i > j``, in
    its neighbour order), then put in its channel order. 3D: 12 pairs of the six-neighbourhood;
    2D: 4 pairs of the four-neighbourhood."""
    if ndim == 3:  # the reference's six-neighbourhood, as positions in a 3×3×3 kernel
        hood = [(0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)]
    else:  # its 2D analogue: the four-neighbourhood in a 3×3 kernel
        hood = [(0, 1), (1, 0), (2, 1), (1, 2)]
    offsets = [tuple(p - 1 for p in n) for n in hood]
    pairs = [
        (offsets[i], offsets[j]) for i, j in itertools.product(range(len(hood)), repeat=2)
        if i > j and sum((a - b) ** 2 for a, b in zip(offsets[i], offsets[j])) == 2
    ]
    return [pairs[k] for k in _REFERENCE_ORDER[ndim]]


def _pad(x: Tensor, widths: tuple[int, ...]) -> Tensor:
    """Replicate-pad each spatial axis ``i`` of ``(B, C, *S)`` by ``widths[i]`` on both sides."""
    pad = []
    for w in reversed(widths):  # F.pad lists the last axis first
        pad += [w, w]
    return F.pad(x, pad, mode="replicate")


def _shifted(padded: Tensor, offset: tuple[int, ...], margin: int, shape) -> Tensor:
    """``x(p + offset)`` from ``x`` padded by ``margin`` (replicated borders)."""
    for axis, (o, n) in enumerate(zip(offset, shape)):
        padded = padded.narrow(2 + axis, margin + o, n)
    return padded


def _box_mean(x: Tensor, radius: int) -> Tensor:
    """Mean over the ``(2r + 1)^ndim`` box around each voxel, replicated borders (separable)."""
    if radius == 0:
        return x
    ndim = x.dim() - 2
    for axis in range(ndim):
        widths = tuple(radius if a == axis else 0 for a in range(ndim))
        xp, n = _pad(x, widths), x.shape[2 + axis]
        total = xp.narrow(2 + axis, 0, n)
        for k in range(1, 2 * radius + 1):
            total = total + xp.narrow(2 + axis, k, n)
        x = total / (2 * radius + 1)
    return x


def mind_ssc(image: Tensor, radius: int = 2, dilation: int = 2) -> Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013) of every channel of ``image``.

    For each pair ``(n, m)`` of the self-similarity context (3D: the 12 pairs of the six
    face neighbours ``±δe_k`` that lie √2δ apart; 2D, the analogous pattern: the 4 such pairs of
    the four face neighbours), the patch distance ``D(x) = box_r[(I(x + n) − I(x + m))²]``
    (``δ = dilation`` voxels, box of side ``2r + 1``, replicated borders); then
    ``MIND = exp(−(D − min_pairs D) / V)`` with ``V = mean_pairs (D − min_pairs D)`` clamped to
    [1e-3, 1e3] × its mean over the image. Follows the authors' PyTorch reference
    (``MINDSSC(img, radius=2, dilation=2)`` of the Heinrich group's registration code: same
    pattern, box filter, normalisation and channel order), with two differences: the variance
    clamp uses each image's own mean (the reference: the whole batch's), so a batch element's
    features do not depend on the others; and a constant image gives 1 everywhere (the
    reference: 0/0).

    Args:
        image: ``(B, C, *S)`` floating, ``S`` = ``(Z, Y, X)`` or ``(Y, X)``.
        radius: box half-width ``r ≥ 0`` in voxels (patch ``(2r + 1)^ndim``).
        dilation: neighbour distance ``δ ≥ 1`` in voxels.

    Returns:
        ``(B, C·K, *S)`` in ``(0, 1]``, ``K`` = 12 (3D) or 4 (2D): the K descriptors of channel
        0, then those of channel 1, … Differentiable (the minimum shares its gradient among
        the pairs that tie).
    """
    image = check_image_layout(image, "image")
    radius = check_int(radius, "radius", 0)
    dilation = check_int(dilation, "dilation", 1)
    batch, channels, *shape = image.shape
    ndim = len(shape)
    x = image.reshape(batch * channels, 1, *shape)
    padded = _pad(x, (dilation,) * ndim)
    ssd = torch.cat([
        _box_mean((_shifted(padded, tuple(dilation * o for o in n), dilation, shape)
                   - _shifted(padded, tuple(dilation * o for o in m), dilation, shape)) ** 2,
                  radius)
        for n, m in _neighbour_pairs(ndim)
    ], dim=1)  # (B·C, K, *S)
    mind = ssd - ssd.amin(dim=1, keepdim=True)
    var = mind.mean(dim=1, keepdim=True)
    mean = var.flatten(1).mean(1).view(-1, *([1] * (ndim + 1)))
    clamped = torch.maximum(torch.minimum(var, VARIANCE_CLAMP[1] * mean), VARIANCE_CLAMP[0] * mean)
    # A constant image (mean 0) divides 0 by 1, not by 0: features 1, finite gradients.
    out = torch.exp(-mind / torch.where(mean > 0, clamped, torch.ones_like(var)))
    return out.reshape(batch, channels * out.shape[1], *shape)


def image_features(image: Tensor, features: str) -> Tensor:
    """The registration's view of ``image`` ``(B, C, *S)``: itself (``"none"``) or its
    :func:`mind_ssc` descriptors with the default radius and dilation (``"mind"``)."""
    if features == "none":
        return image
    if features == "mind":
        return mind_ssc(image)
    raise ValueError(f"features: expected one of {list(FEATURES)}, got {features!r}")
