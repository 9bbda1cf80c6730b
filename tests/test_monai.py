"""Interop with MONAI (the optional extra ``monai``; skipped where it is not installed).

The library's displacement convention (voxel units, component ``i`` along spatial axis ``i``,
pull-back, border padding) is MONAI's ``ddf`` convention: ``monai.networks.blocks.Warp`` applied
to our displacement gives our warped image, and a MONAI network's ``ddf`` is a valid
``initial_displacement`` for :class:`nadmm_torch.NADMMRegistration`.
"""

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample

from .synthetic import smooth_field

monai = pytest.importorskip("monai", reason="the optional extra 'monai' is not installed")
from monai.networks.blocks import Warp  # noqa: E402

# MONAI says which grid_sample it uses; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


@pytest.mark.parametrize("ndim", [2, 3])
def test_our_warp_equals_monai_warp(ndim):
    pair = load_sample()
    image = pair.moving if ndim == 3 else pair.moving[:, :, 4]
    d = smooth_field(tuple(image.shape[2:]), amplitude=3.0)
    ours = nt.warp(image, d)
    theirs = Warp(mode="bilinear", padding_mode="border")(image, d)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # Not trivially equal: the field moves the image.
    assert (ours - image).abs().max() > 0.1


def test_registration_result_applies_in_monai():
    pair = load_sample()
    fixed, moving = pair.fixed[:, :, 4], pair.moving[:, :, 4]
    d = nt.register(fixed, moving, spacing=pair.spacing[1:])
    torch.testing.assert_close(Warp()(moving, d), nt.warp(moving, d), rtol=0, atol=1e-5)


def test_monai_network_feeds_the_layer_and_gets_gradients():
    from monai.networks.nets import VoxelMorph, VoxelMorphUNet

    torch.manual_seed(0)
    pair = load_sample()
    fixed, moving = pair.fixed[:, :, 4, 32:96, 32:96], pair.moving[:, :, 4, 32:96, 32:96]
    backbone = VoxelMorphUNet(
        spatial_dims=2, in_channels=2, unet_out_channels=8, channels=(8, 8, 8, 8),
        final_conv_channels=(8,),
    )
    net = VoxelMorph(backbone=backbone, integration_steps=0, spatial_dims=2)
    _, ddf = net(moving, fixed)
    layer = nt.NADMMRegistration("fast", learnable={"lambda"})
    d = layer(fixed, moving, spacing=(1.5, 1.5), initial_displacement=ddf)
    loss = monai.losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=5)(
        nt.warp(moving, d), fixed
    )
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    assert layer.log_lam.grad is not None and bool(layer.log_lam.grad.abs().sum() > 0)


def test_monai_network_adapter_pads_and_crops():
    from monai.networks.nets import VoxelMorph

    from nadmm_torch.networks import MonaiNetwork, NetworkWithNADMM

    torch.manual_seed(0)
    pair = load_sample()
    fixed, moving = pair.fixed[..., 40:90, 30:100], pair.moving[..., 40:90, 30:100]  # 10 x 50 x 70
    net = MonaiNetwork(VoxelMorph(spatial_dims=3, integration_steps=0), multiple=16)
    d0 = net(fixed, moving)
    assert d0.shape == (1, 3, *fixed.shape[2:])
    model = NetworkWithNADMM(net, nt.NADMMRegistration("fast"))
    with torch.no_grad():
        d, init = model(fixed, moving, pair.spacing, return_initial=True)
    torch.testing.assert_close(init, d0)
    assert float(nt.fold_percent(d)[0]) == 0.0
    with pytest.raises(ValueError, match="multiple"):
        MonaiNetwork(net, multiple=0)
