"""nadmm-torch: Nesterov-accelerated ADMM diffeomorphic image registration in PyTorch.

Public API::

    register(fixed, moving, *, spacing=None, preset="fast", data_term=None, order=None,
             compile=False, **overrides)  (preset: a name, a settings file or a SolverConfig)
    warp(image, displacement, mode="bilinear" | "nearest")
    affine(fixed, moving, *, spacing=None, similarity="ncc" | "mi", ...) -> A (B, ndim, ndim+1)
    affine_to_displacement(A, shape)
    warp_labels(labels, displacement)  (integer label maps, argmax of the warped one-hot)
    apply(image, displacement=None, *, affine=None, labels=False)  (a saved transform;
        io.read_displacement reads displacement.nii.gz)
    invert(displacement, *, iterations=50, tolerance=1e-3)  (fixed-point inverse field)
    mind_ssc(image, radius=2, dilation=2)  (MIND-SSC descriptors; register(..., features="mind")
        registers them: multi-modal pairs)
    NADMMRegistration(preset="fast", *, data_term=None, order=None, learnable=None, ...)
    SolverConfig.from_preset(preset="fast", data_term=None, order=None, **overrides)
    tune(pairs, *, preset="fast", ...) -> TuneResult; load_settings(path)
    metrics.dice / hausdorff_slices / jacobian_determinant / fold_percent
    losses.MSELoss / NCCLoss / DiceLoss / SmoothnessLoss / JacobianFoldLoss
    RegistrationLightningModule (nadmm_torch.lightning; imported on first use, since
    pytorch_lightning takes seconds to import)

Conventions: images ``(B, C, *S)``; displacements ``(B, ndim, *S)`` in voxel units, component
``i`` along spatial axis ``i``; pull-back warping ``I(x + d(x))``.
"""

import os as _os
import sys as _sys

# PyTorch's CPU kernels run in OpenMP regions, and libgomp's idle threads spin (by default
# for ~300 000 polls) before they sleep: with other processes competing for the cores, every
# one of the solver's thousands of small regions then waits for a parked sibling thread
# (``fast``, 2 threads, busy 2-core machine: 10–17 s instead of 0.1–0.2 s). Passive waiting
# fixes that but costs 1.7–2× on a quiet machine (every region wakes sleeping threads); a
# short spin, 1000 polls, keeps the quiet machine's speed and brings the busy one within 1.6×
# of passive (``benchmarks/threads.py``; README: Speed). Set unless the user chose a policy;
# libgomp reads it when torch loads it, so it takes effect only where torch was not imported
# before this package.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "1000"

from . import losses, metrics  # noqa: E402
from .api import affine, affine_to_displacement, register, warp, warp_labels
from .config import PRESETS, SolverConfig, preset_config
from .metrics import dice, fold_percent, hausdorff_slices, jacobian_determinant
from .module import NADMMRegistration
from .ops.features import mind_ssc
from .ops.inverse import invert
from .ops.solver import Diagnostics
from .transforms import apply
from .tuning import TunePair, load_settings, tune

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing pytorch_lightning costs ~3 s, only pay it when the module is used.
    if name == "RegistrationLightningModule":
        from .lightning import RegistrationLightningModule

        return RegistrationLightningModule
    if name == "io":  # nt.io without importing SimpleITK at package import
        import importlib

        return importlib.import_module(".io", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NADMMRegistration",
    "register",
    "warp",
    "affine",
    "affine_to_displacement",
    "warp_labels",
    "apply",
    "invert",
    "mind_ssc",
    "metrics",
    "losses",
    "RegistrationLightningModule",
    "dice",
    "hausdorff_slices",
    "jacobian_determinant",
    "fold_percent",
    "SolverConfig",
    "Diagnostics",
    "PRESETS",
    "preset_config",
    "tune",
    "TunePair",
    "load_settings",
    "__version__",
]
