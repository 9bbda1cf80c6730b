"""nadmm_torch.viz: figures are written, and no pyplot state leaks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from nadmm_torch import viz

PNG = b"\x89PNG\r\n\x1a\n"


def _case(shape):
    axes = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
    fixed = sum(torch.sin((3 + k) * a) for k, a in enumerate(axes))[None, None]
    moving = torch.roll(fixed, 2, dims=-1)
    d = torch.stack([1.5 * torch.sin(np.pi * axes[-1]) * torch.sin(np.pi * a) for a in axes])[None]
    labels = (fixed > 0.8).long() + (fixed > 1.5).long()
    return fixed, moving, d, labels


@pytest.mark.parametrize("shape", [(6, 40, 36), (40, 36)])
def test_plot_registration_writes_png(tmp_path, shape):
    fixed, moving, d, labels = _case(shape)
    path = viz.plot_registration(
        fixed, moving, moving, d, fixed_labels=labels, warped_labels=labels,
        moving_labels=labels, spacing=(5.0, 1.5, 1.5)[-len(shape):], path=tmp_path / "r.png",
        title="test",
    )
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]  # no temporary left behind


def test_no_pyplot_state():
    fixed, moving, d, _ = _case((30, 30))
    fig = viz.plot_registration(fixed, moving, moving, d, path=None)
    assert fig.axes
    plt = sys.modules.get("matplotlib.pyplot")
    assert plt is None or plt.get_fignums() == []


def test_helpers():
    vol = torch.zeros(1, 1, 5, 8, 8, dtype=torch.long)
    vol[..., 3, 1:7, 1:7] = 1
    vol[..., 1, 2:4, 2:4] = 2
    assert viz.choose_slice(vol, vol) == 3
    assert viz.choose_slice(vol) == 2  # middle without labels

    board = viz.checkerboard(np.zeros((16, 16)), np.ones((16, 16)), tiles=4)
    assert board[0, 0] == 0 and board[0, 4] == 1 and board[4, 4] == 0

    rgb = viz.displacement_rgb(np.zeros((2, 4, 4)))
    assert np.allclose(rgb, 1.0)  # no motion: white
    right = viz.displacement_rgb(np.stack([np.zeros((2, 2)), np.ones((2, 2))]))
    left = viz.displacement_rgb(np.stack([np.zeros((2, 2)), -np.ones((2, 2))]))
    assert np.allclose(right[0, 0], [1, 0, 0])  # hue 0: red
    assert not np.allclose(left[0, 0], right[0, 0])
