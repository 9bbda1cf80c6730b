"""TorchIO images as arguments of the public functions that take tensors (``warp``,
``warp_labels``, ``dice``): unpacked into this package's layout by :mod:`nadmm_torch.io`, and
results given back as TorchIO images. TorchIO and ``nadmm_torch.io`` (SimpleITK) are imported
only when a TorchIO object is passed; recognising one imports nothing.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["is_torchio", "torchio_tensor", "as_torchio_like"]


def is_torchio(obj: object) -> bool:
    """A TorchIO object (image, subject, …), recognised without importing TorchIO."""
    return not isinstance(obj, Tensor) and type(obj).__module__.split(".")[0] == "torchio"


def torchio_tensor(obj, name: str, like: object = None, label: bool = False) -> Tensor:
    """A ``tio.Image`` as this package's ``(1, C, *S)`` tensor (array order, float32 for a
    ``ScalarImage``, int64 for a ``LabelMap``; :func:`nadmm_torch.io.from_torchio`), on the
    device of ``like`` where that is a tensor (TorchIO keeps its data on the CPU). ``label``:
    only a ``tio.LabelMap`` is accepted (a ``ScalarImage`` would hold floats)."""
    import torchio as tio

    from .io import from_torchio

    kind = "a tio.LabelMap" if label else "a tio.Image"
    if not isinstance(obj, tio.Image):
        raise TypeError(f"{name}: expected a tensor or {kind}, got {type(obj).__name__}")
    if label and not isinstance(obj, tio.LabelMap):
        raise TypeError(
            f"{name}: expected an integer tensor or a tio.LabelMap, got a "
            f"{type(obj).__name__}; load label maps as tio.LabelMap"
        )
    tensor, _ = from_torchio(obj)
    return tensor.to(like.device) if isinstance(like, Tensor) else tensor


def as_torchio_like(tensor: Tensor, source):
    """``tensor`` ``(1, C, *S)`` as a TorchIO image of ``source``'s kind (``LabelMap`` or
    ``ScalarImage``) with ``source``'s affine: the result of a warp on ``source``'s grid."""
    import torchio as tio

    from .io import to_torchio

    return to_torchio(tensor, source.affine, label=isinstance(source, tio.LabelMap))
