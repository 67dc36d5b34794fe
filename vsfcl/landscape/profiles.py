"""Loss profiles along principal directions.

The profile along a unit direction ``p_i`` is ``L_i(theta) = L(w_0 + theta p_i)``, the
mean cross-entropy over the full training set with only the analysed parameters moved
and every other parameter held at its value in the model.

:class:`ProfileEvaluator` computes the loss at many points in one pass: it stacks the
points' weights and maps the network over them with ``torch.func.vmap`` and
``functional_call``. When the analysed parameters sit in one stage of a sequential
network (for the MLP, ``features.fc2.weight``), the activations entering that stage do
not depend on the point, so they are computed once and only the later stages run per
point. When that stage is a linear layer, its output is affine in the offset:
``(W_0 + theta P_i) h + b = (W_0 h + b) + theta (P_i h)``. The responses ``P_i h`` are
therefore computed once per direction and kept in a cache of bounded size, and each
point costs only the layers after it. The data are processed in chunks and the per-sample losses summed in float64,
so the result is the exact full-batch mean up to float32 rounding in the network.
:func:`reference_losses` is the plain one-point-at-a-time evaluation kept as a check.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from vsfcl.flatness import FlatnessResult, LossAlong, find_flatness
from vsfcl.landscape.trajectory import unflatten_parameters
from vsfcl.models import MLP

log = logging.getLogger(__name__)

# (qualified prefix of the stage's parameters, module) in forward order.
Stage = tuple[str, nn.Module]


def sequential_stages(model: nn.Module) -> list[Stage] | None:
    """Split a model into the stages its forward pass applies in order.

    Returns None for a model whose forward pass is not a known chain; the evaluator
    then runs the whole model per point without caching.
    """
    if isinstance(model, MLP):
        stages: list[Stage] = [("", nn.Flatten())]
        stages += [(f"features.{name}", module) for name, module in model.features.named_children()]
        stages.append(("head", model.head))
        return stages
    if isinstance(model, nn.Sequential):
        return [(name, module) for name, module in model.named_children()]
    return None


class ProfileEvaluator:
    """Full-batch training loss at batches of points ``w_0 + offset * p_i``.

    Parameters
    ----------
    model : nn.Module
        Network in evaluation state. Parameters outside ``parameter_names`` keep the
        values they have when the evaluator is built.
    parameter_names : sequence of str
        Analysed parameters, in the order of the flattened vectors.
    center : Tensor of shape (n_params,)
        ``w_0`` for the analysed parameters.
    directions : Tensor of shape (n_directions, n_params)
        Unit directions ``p_i`` as rows.
    inputs : Tensor of shape (n_samples, ...)
        Training inputs, on the device the evaluation should run on.
    targets : Tensor of shape (n_samples,), int64
        Class labels.
    max_batch : int
        Most points evaluated in one vectorised pass; memory grows as
        ``max_batch * chunk_size * widest layer``.
    chunk_size : int
        Samples per chunk of the data.
    cache_activations : bool
        Compute the activations entering the first analysed stage once, and use the
        linear-layer shortcut when it applies. Without it, every point runs the whole
        network.
    response_cache_bytes : int
        Memory allowed for the cached per-direction responses ``P_i h`` of the
        linear-layer shortcut. Each takes n_samples x layer width floats, and the least
        recently used are dropped beyond the limit.
    """

    def __init__(
        self,
        model: nn.Module,
        parameter_names: Sequence[str],
        center: Tensor,
        directions: Tensor,
        inputs: Tensor,
        targets: Tensor,
        max_batch: int = 64,
        chunk_size: int = 512,
        cache_activations: bool = True,
        response_cache_bytes: int = 2 * 1024**3,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be at least 1")
        if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs ({inputs.shape[0]} samples) and targets ({targets.shape[0]}) must be "
                "non-empty and of the same length"
            )
        if directions.ndim != 2 or directions.shape[1] != center.shape[0]:
            raise ValueError(
                f"directions of shape {tuple(directions.shape)} do not match a center of "
                f"{center.shape[0]} entries; expected (n_directions, {center.shape[0]})"
            )

        self.model = model.eval()
        self.parameter_names = list(parameter_names)
        device = inputs.device
        self.center = center.to(device, torch.float32)
        self.directions = directions.to(device, torch.float32)
        self.targets = targets.to(device)
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.n_samples = int(inputs.shape[0])
        self.n_points_evaluated = 0
        self.seconds = 0.0

        stages = sequential_stages(model) if cache_activations else None
        if stages is not None and not _stages_match_model(model, stages, inputs[:8]):
            log.warning(
                "The stage decomposition of %s does not reproduce its output; "
                "evaluating the whole model per point",
                type(model).__name__,
            )
            stages = None
        if stages is None:
            stages = [("", model)]
        self._suffix, prefix = _split_stages(stages, self.parameter_names)
        self.n_cached_stages = len(prefix)

        # The activations entering the first analysed stage do not depend on the point.
        with torch.no_grad():
            self.stage_inputs = _run_stages(prefix, inputs, chunk_size)
        self._linear = self._linear_shortcut() if cache_activations else None
        self._responses: OrderedDict[int, Tensor] = OrderedDict()
        self._response_cache_bytes = response_cache_bytes
        log.info(
            "Profile evaluator: %d samples, %d cached stages, stage input shape %s, "
            "linear-layer shortcut %s",
            self.n_samples,
            self.n_cached_stages,
            tuple(self.stage_inputs.shape),
            "on" if self._linear is not None else "off",
        )

    def _linear_shortcut(self) -> _LinearShortcut | None:
        """Prepare the affine evaluation when the analysed parameters are one linear layer's."""
        first_parameters, first_module = self._suffix[0]
        later_analysed = any(stage_parameters for stage_parameters, _ in self._suffix[1:])
        if not isinstance(first_module, nn.Linear) or later_analysed:
            return None
        layer = {short: full for short, full in first_parameters}
        center = unflatten_parameters(self.model, self.parameter_names, self.center)
        weight = center[layer["weight"]] if "weight" in layer else first_module.weight.detach()
        bias = center[layer["bias"]] if "bias" in layer else first_module.bias
        with torch.no_grad():
            base = F.linear(self.stage_inputs, weight, None if bias is None else bias.detach())
        return _LinearShortcut(
            weight_name=layer.get("weight"),
            bias_name=layer.get("bias"),
            base=base,
            later_stages=[module for _, module in self._suffix[1:]],
        )

    def _response(self, direction: int) -> Tensor:
        """Return ``P_i h`` of shape (n_samples, layer width), from the cache when present."""
        cached = self._responses.get(direction)
        if cached is not None:
            self._responses.move_to_end(direction)
            return cached
        shortcut = self._linear
        assert shortcut is not None, "the linear shortcut is used only when it was built"
        parts = unflatten_parameters(self.model, self.parameter_names, self.directions[direction])
        weight = parts[shortcut.weight_name] if shortcut.weight_name else None
        bias = parts[shortcut.bias_name] if shortcut.bias_name else None
        if weight is None:
            assert bias is not None, "a linear shortcut has a weight, a bias or both"
            response = bias.expand_as(shortcut.base)
        else:
            response = F.linear(self.stage_inputs, weight, bias)
        n_bytes = response.numel() * response.element_size()
        if n_bytes <= self._response_cache_bytes:
            while (
                self._responses
                and n_bytes * (len(self._responses) + 1) > self._response_cache_bytes
            ):
                self._responses.popitem(last=False)
            self._responses[direction] = response
        return response

    def _shortcut_loss(self, index: Tensor, offsets: Tensor) -> Tensor:
        """Return the mean losses at ``w_0 + offsets[j] p[index[j]]`` with the linear shortcut."""
        shortcut = self._linear
        assert shortcut is not None, "the linear shortcut is used only when it was built"
        width = shortcut.base.shape[1]
        total = torch.zeros(index.shape[0], dtype=torch.float64, device=offsets.device)
        for begin in range(0, index.shape[0], self.max_batch):
            batch_index = index[begin : begin + self.max_batch].tolist()
            batch_offsets = offsets[begin : begin + self.max_batch].tolist()
            n_points = len(batch_index)
            responses = [self._response(i) for i in batch_index]
            # Each point's layer output is written in place into one buffer reused across
            # chunks. This saves a full pass over memory compared with stacking.
            buffer = torch.empty(n_points, self.chunk_size, width, device=shortcut.base.device)
            for start in range(0, self.n_samples, self.chunk_size):
                stop = min(start + self.chunk_size, self.n_samples)
                x = buffer[:, : stop - start]
                base = shortcut.base[start:stop]
                for j, (response, offset) in enumerate(zip(responses, batch_offsets, strict=False)):
                    torch.add(base, response[start:stop], alpha=offset, out=x[j])
                for module in shortcut.later_stages:
                    x = x.relu_() if isinstance(module, nn.ReLU) else module(x)
                # (n_points, chunk, n_classes) logits; the loss of sample b is -log p(y_b).
                log_probabilities = torch.log_softmax(x, dim=-1)
                y = self.targets[start:stop].expand(n_points, -1).unsqueeze(-1)
                per_sample = log_probabilities.gather(-1, y).squeeze(-1)
                total[begin : begin + n_points] -= per_sample.sum(dim=1, dtype=torch.float64)
        return total / self.n_samples

    def _suffix_logits(self, parameters: dict[str, Tensor], x: Tensor) -> Tensor:
        for stage_parameters, module in self._suffix:
            if stage_parameters:
                local = {short: parameters[full] for short, full in stage_parameters}
                x = functional_call(module, local, (x,))
            else:
                x = module(x)
        return x

    def loss_at(self, points: Tensor) -> Tensor:
        """Return the full-batch mean loss at each point.

        Parameters
        ----------
        points : Tensor of shape (n_points, n_params)
            Values of the analysed parameters.

        Returns
        -------
        Tensor of shape (n_points,), float64, on the CPU
        """
        start = time.perf_counter()
        losses = []
        with torch.no_grad():
            for batch in torch.split(points.to(self.center.device, torch.float32), self.max_batch):
                losses.append(self._batch_loss(batch))
        self.n_points_evaluated += int(points.shape[0])
        self.seconds += time.perf_counter() - start
        return torch.cat(losses).cpu()

    def _batch_loss(self, batch: Tensor) -> Tensor:
        n_points = batch.shape[0]
        parameters = unflatten_parameters(self.model, self.parameter_names, batch)
        batched_logits = vmap(self._suffix_logits, in_dims=(0, None))
        total = torch.zeros(n_points, dtype=torch.float64, device=batch.device)
        for start in range(0, self.n_samples, self.chunk_size):
            x = self.stage_inputs[start : start + self.chunk_size]
            y = self.targets[start : start + self.chunk_size]
            logits = batched_logits(parameters, x)  # (n_points, chunk, n_classes)
            per_sample = F.cross_entropy(
                logits.flatten(0, 1), y.repeat(n_points), reduction="none"
            ).view(n_points, -1)
            total += per_sample.sum(dim=1, dtype=torch.float64)
        return total / self.n_samples

    def losses(self, direction_index: Tensor, offsets: Tensor) -> Tensor:
        """Return ``L(w_0 + offsets[j] * p[direction_index[j]])`` for each j, shape (n_points,)."""
        index = torch.as_tensor(direction_index, dtype=torch.int64).to(self.center.device)
        offsets = torch.as_tensor(offsets, dtype=torch.float64).to(self.center.device)
        if index.shape != offsets.shape or index.ndim != 1:
            raise ValueError(
                f"direction_index {tuple(index.shape)} and offsets {tuple(offsets.shape)} "
                "must be 1-D of the same length"
            )
        if self._linear is not None:
            start = time.perf_counter()
            with torch.no_grad():
                losses = self._shortcut_loss(index, offsets)
            self.n_points_evaluated += int(index.shape[0])
            self.seconds += time.perf_counter() - start
            return losses.cpu()
        # Offsets are formed in float64 so that small steps are not lost against w_0.
        points = self.center.double() + offsets[:, None] * self.directions[index].double()
        return self.loss_at(points)

    def center_loss(self) -> float:
        """Return ``L_0 = L(w_0)``."""
        return float(self.losses(torch.zeros(1, dtype=torch.int64), torch.zeros(1))[0])

    def loss_along(self) -> LossAlong:
        """Return the ``loss_along(direction_index, offset)`` callable of :func:`find_flatness`."""
        return self.losses

    def flatness(
        self, variances: Tensor, initial_step_scale: float, max_offset: float, rtol: float
    ) -> FlatnessResult:
        """Find the ``e L_0`` crossings along the first ``len(variances)`` directions.

        The search on direction ``i`` starts at ``initial_step_scale * sigma_i``, where
        ``sigma_i^2`` is ``variances[i]``, because the crossing scales with the spread.
        """
        initial_step = (initial_step_scale * variances.double().sqrt()).clamp_min(1e-8)
        return find_flatness(
            self.loss_along(),
            int(variances.shape[0]),
            self.center_loss(),
            initial_step.cpu(),
            max_offset,
            rtol=rtol,
        )

    def profile_grid(self, direction_indices: Sequence[int], offsets: Tensor) -> Tensor:
        """Evaluate profiles on a grid of offsets.

        Returns
        -------
        Tensor of shape (len(direction_indices), len(offsets)), float64
        """
        offsets = torch.as_tensor(offsets, dtype=torch.float64)
        index = torch.as_tensor(list(direction_indices), dtype=torch.int64)
        all_index = index.repeat_interleave(offsets.numel())
        all_offsets = offsets.repeat(index.numel())
        return self.losses(all_index, all_offsets).view(index.numel(), offsets.numel())

    def loss_terms(self, chunk_size: int | None = None) -> list[Callable[[Tensor], Tensor]]:
        """Return one differentiable function per data chunk whose sum is the full-batch loss.

        Each function maps the analysed parameters, a tensor of shape (n_params,), to
        that chunk's summed loss divided by the number of training samples. They are
        meant for ``torch.func`` transforms such as Hessian-vector products.
        ``chunk_size`` defaults to the evaluator's.
        """
        chunk_size = chunk_size or self.chunk_size
        terms = []
        for start in range(0, self.n_samples, chunk_size):
            x = self.stage_inputs[start : start + chunk_size]
            y = self.targets[start : start + chunk_size]
            terms.append(self._chunk_term(x, y))
        return terms

    def _chunk_term(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        def term(flat: Tensor) -> Tensor:
            parameters = unflatten_parameters(self.model, self.parameter_names, flat)
            logits = self._suffix_logits(parameters, x)
            return F.cross_entropy(logits, y, reduction="sum") / self.n_samples

        return term


@dataclass
class _LinearShortcut:
    """Cached pieces of the affine evaluation of one analysed linear layer."""

    weight_name: str | None
    bias_name: str | None
    base: Tensor  # (n_samples, width): the layer's output at w_0
    later_stages: list[nn.Module]


def _split_stages(
    stages: list[Stage], parameter_names: Sequence[str]
) -> tuple[list[tuple[list[tuple[str, str]], nn.Module]], list[nn.Module]]:
    """Split stages into a cached prefix and a suffix that carries the analysed parameters."""
    names = set(parameter_names)
    suffix: list[tuple[list[tuple[str, str]], nn.Module]] = []
    prefix: list[nn.Module] = []
    claimed: set[str] = set()
    for qualifier, module in stages:
        stage_parameters = []
        for short, _ in module.named_parameters():
            full = f"{qualifier}.{short}" if qualifier else short
            if full in names:
                stage_parameters.append((short, full))
                claimed.add(full)
        if not suffix and not stage_parameters:
            prefix.append(module)
        else:
            suffix.append((stage_parameters, module))
    missing = names - claimed
    if missing:
        raise ValueError(f"parameters {sorted(missing)} were not found in the model's stages")
    return suffix, prefix


def _run_stages(modules: list[nn.Module], inputs: Tensor, chunk_size: int) -> Tensor:
    if not modules:
        return inputs
    outputs = []
    for start in range(0, inputs.shape[0], chunk_size):
        x = inputs[start : start + chunk_size]
        for module in modules:
            x = module(x)
        outputs.append(x)
    return torch.cat(outputs)


def _stages_match_model(model: nn.Module, stages: list[Stage], sample: Tensor) -> bool:
    with torch.no_grad():
        expected = model(sample)
        actual = _run_stages([module for _, module in stages], sample, sample.shape[0])
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


def reference_losses(
    model: nn.Module,
    parameter_names: Sequence[str],
    center: Tensor,
    directions: Tensor,
    direction_index: Tensor,
    offsets: Tensor,
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int = 4096,
) -> Tensor:
    """Evaluate the same losses as :meth:`ProfileEvaluator.losses`, one point at a time.

    Each point runs the whole model over every chunk of the data with no caching or
    vectorisation. It is the slow reference that the batched evaluator is tested and
    timed against.

    Returns
    -------
    Tensor of shape (n_points,), float64, on the CPU
    """
    model = model.eval()
    device = inputs.device
    n_samples = inputs.shape[0]
    losses = torch.empty(len(direction_index), dtype=torch.float64)
    with torch.no_grad():
        for j, (i, offset) in enumerate(
            zip(direction_index.tolist(), offsets.tolist(), strict=False)
        ):
            point = center.double() + offset * directions[i].double()
            parameters = unflatten_parameters(
                model, parameter_names, point.to(device, torch.float32)
            )
            total = 0.0
            for start in range(0, n_samples, chunk_size):
                logits = functional_call(model, parameters, (inputs[start : start + chunk_size],))
                per_sample = F.cross_entropy(
                    logits, targets[start : start + chunk_size], reduction="none"
                )
                total += float(per_sample.sum(dtype=torch.float64))
            losses[j] = total / n_samples
    return losses
