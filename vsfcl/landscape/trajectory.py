"""Recording of a weight trajectory during training.

A trajectory is a matrix of snapshots of a chosen parameter set, one row per
snapshot, stored in a preallocated CPU buffer so that recording never reallocates.
The default parameter set of the landscape analysis is the hidden-to-hidden weight
matrix ``features.fc2.weight`` of a two-hidden-layer MLP (50 x 50, so 2500 entries).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SnapshotDType = Literal["float32", "float16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def resolve_parameter_names(model: nn.Module, names: Sequence[str] | str) -> list[str]:
    """Expand a parameter selection into the model's parameter names, in model order.

    Parameters
    ----------
    model : nn.Module
    names : sequence of str or "all"
        Fully qualified parameter names such as ``"features.fc2.weight"``, or the
        string ``"all"`` for every trainable parameter.

    Returns
    -------
    list of str
        The selected names, ordered as ``model.named_parameters()`` lists them, which
        fixes the layout of the flattened vector.
    """
    available = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if isinstance(names, str):
        if names != "all":
            names = [names]
        else:
            return available
    requested = list(names)
    if not requested:
        raise ValueError(
            "the parameter selection is empty; name at least one parameter or use 'all'"
        )
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ValueError(
            f"parameters {unknown} are not trainable parameters of the model; "
            f"choose from {available} or use 'all'"
        )
    return [name for name in available if name in set(requested)]


def flatten_parameters(model: nn.Module, names: Sequence[str]) -> Tensor:
    """Concatenate the named parameters into one detached vector of shape (n_params,)."""
    parameters = dict(model.named_parameters())
    return torch.cat([parameters[name].detach().reshape(-1) for name in names])


def unflatten_parameters(model: nn.Module, names: Sequence[str], flat: Tensor) -> dict[str, Tensor]:
    """Split vectors laid out as :func:`flatten_parameters` into named tensors.

    Parameters
    ----------
    flat : Tensor of shape (..., n_params)
        Leading dimensions are kept, so a batch of points of shape (n_points, n_params)
        becomes tensors of shape (n_points, *parameter_shape).
    """
    parameters = dict(model.named_parameters())
    shapes = [parameters[name].shape for name in names]
    sizes = [shape.numel() for shape in shapes]
    if flat.shape[-1] != sum(sizes):
        raise ValueError(
            f"the flat vector has {flat.shape[-1]} entries but the parameters {list(names)} "
            f"have {sum(sizes)}"
        )
    leading = flat.shape[:-1]
    pieces = torch.split(flat, sizes, dim=-1)
    return {
        name: piece.reshape(*leading, *shape)
        for name, piece, shape in zip(names, pieces, shapes, strict=False)
    }


class TrajectoryRecorder:
    """Preallocated buffer of snapshots of a parameter set.

    Parameters
    ----------
    model : nn.Module
        The model being trained. Snapshots read its current parameter values.
    parameter_names : sequence of str or "all"
        Parameters to record (see :func:`resolve_parameter_names`).
    n_snapshots : int
        Capacity of the buffer; recording past it raises.
    dtype : {"float32", "float16"}
        Storage type of the buffer. float16 halves memory and keeps about three
        significant digits, which resolves fluctuations only down to about 1e-3 of
        the weight magnitude.
    coordinate_stride : int
        Keep every ``coordinate_stride``-th entry of the flattened parameter vector,
        which divides memory by that factor. The time average ``<w>_T`` is still
        accumulated over every entry, in float64, and so is the average of every other
        model parameter.
    max_buffer_bytes : int
        Upper bound on the buffer size; a larger request raises with the estimate.

    Attributes
    ----------
    parameter_names : list of str
    n_params : int
        Entries in the full flattened selection.
    recorded_index : Tensor of shape (n_recorded,), int64
        Positions of the recorded entries in the full flattened selection.
    """

    def __init__(
        self,
        model: nn.Module,
        parameter_names: Sequence[str] | str,
        n_snapshots: int,
        dtype: SnapshotDType = "float32",
        coordinate_stride: int = 1,
        max_buffer_bytes: int = 2 * 1024**3,
    ) -> None:
        if n_snapshots < 2:
            raise ValueError(
                f"n_snapshots={n_snapshots} must be at least 2 for a PCA of the trajectory"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid; use one of {sorted(_DTYPES)}")
        if coordinate_stride < 1:
            raise ValueError(f"coordinate_stride={coordinate_stride} must be at least 1")

        self.model = model
        self.parameter_names = resolve_parameter_names(model, parameter_names)
        self.n_params = int(flatten_parameters(model, self.parameter_names).numel())
        self.recorded_index = torch.arange(0, self.n_params, coordinate_stride)
        self.coordinate_stride = coordinate_stride

        n_recorded = int(self.recorded_index.numel())
        storage = _DTYPES[dtype]
        n_bytes = n_snapshots * n_recorded * torch.finfo(storage).bits // 8
        if n_bytes > max_buffer_bytes:
            raise ValueError(
                f"a trajectory of {n_snapshots} snapshots x {n_recorded} entries in {dtype} "
                f"needs {n_bytes / 1024**3:.2f} GiB, over the limit of "
                f"{max_buffer_bytes / 1024**3:.2f} GiB; record fewer parameters, use "
                "dtype='float16', a coordinate_stride above 1, a longer snapshot interval, "
                "or raise the limit"
            )
        log.info(
            "Recording %d snapshots of %d entries (%s, %.1f MiB) from %s",
            n_snapshots,
            n_recorded,
            dtype,
            n_bytes / 1024**2,
            self.parameter_names,
        )
        self.snapshots = torch.empty(n_snapshots, n_recorded, dtype=storage)
        self.iterations = torch.empty(n_snapshots, dtype=torch.int64)
        # Running float64 sums of every parameter of the model, recorded or not, so that
        # the whole network can be placed at its time average for the analysis.
        self._sums = {
            name: torch.zeros(parameter.shape, dtype=torch.float64)
            for name, parameter in model.named_parameters()
        }
        self._count = 0

    @property
    def n_recorded_snapshots(self) -> int:
        return self._count

    def record(self, iteration: int) -> None:
        """Store the current parameter values as the next snapshot."""
        if self._count >= self.snapshots.shape[0]:
            raise RuntimeError(
                f"the trajectory buffer is full ({self.snapshots.shape[0]} snapshots); "
                "allocate more snapshots or record less often"
            )
        for name, parameter in self.model.named_parameters():
            self._sums[name] += parameter.detach().to("cpu", torch.float64)
        flat = flatten_parameters(self.model, self.parameter_names).to("cpu", torch.float64)
        if self.coordinate_stride == 1:
            self.snapshots[self._count] = flat
        else:
            self.snapshots[self._count] = flat[self.recorded_index]
        self.iterations[self._count] = iteration
        self._count += 1

    def trajectory(self) -> Tensor:
        """Return the recorded snapshots as float32, shape (n_recorded_snapshots, n_recorded)."""
        return self.snapshots[: self._count].to(torch.float32)

    def time_average(self) -> Tensor:
        """Return ``<w>_T`` over every entry of the selection, shape (n_params,), float32."""
        averages = self.time_averaged_parameters()
        return torch.cat([averages[name].reshape(-1) for name in self.parameter_names])

    def time_averaged_parameters(self) -> dict[str, Tensor]:
        """Return the time average of every model parameter over the recorded snapshots, float32."""
        if self._count == 0:
            raise RuntimeError("no snapshot has been recorded yet")
        return {name: (total / self._count).to(torch.float32) for name, total in self._sums.items()}

    def embed(self, vectors: Tensor) -> Tensor:
        """Place vectors over the recorded entries into the full selection, zeros elsewhere.

        Parameters
        ----------
        vectors : Tensor of shape (n_vectors, n_recorded)

        Returns
        -------
        Tensor of shape (n_vectors, n_params)
        """
        if self.coordinate_stride == 1:
            return vectors
        full = vectors.new_zeros(vectors.shape[0], self.n_params)
        full[:, self.recorded_index] = vectors
        return full
