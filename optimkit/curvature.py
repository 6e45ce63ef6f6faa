r"""Per-layer curvature statistics collected by module hooks (K-FAC, MKOR, AdaFisher).

Model-aware second-order optimizers precondition the gradient of a layer
:math:`s = W \bar a` (weight :math:`W`, input :math:`a`, :math:`\bar a = [a; 1]` when the
layer has a trainable bias) with statistics of two quantities the backward pass already
computes: the layer's inputs :math:`\bar a` and the gradients :math:`g = \partial L/\partial s`
of its outputs. This module holds what they share, written once:

* :class:`Layer`: one preconditioned layer (``nn.Linear``, or ``nn.Conv2d`` with ``groups=1``,
  numeric padding and ``padding_mode="zeros"``), its parameters, and the maps between its
  gradient and the :math:`d_{out} \times (d_{in} [+1])` matrix form used by Kronecker factors.
  A convolution's input rows are its patches (``torch.nn.functional.unfold``), one row per
  example and output position, in the ``(C_in, k_h, k_w)`` order of ``weight.view(out, -1)``.
* :class:`LayerCapture`: forward hooks that keep, for each layer, the input of the last forward
  pass run with gradients enabled and (through a tensor hook on the output) the gradient of its
  output in the following backward pass. Only references are kept; they are dropped after each
  optimizer step. With several forward/backward passes between two steps (gradient
  accumulation), the last pass is used.
* :class:`CurvatureOptimizer`: the base class. Its constructor takes either an ``nn.Module``
  (its parameters form one param group; its supported layers are preconditioned) or, like any
  torch optimizer, an iterable of tensors or param-group dicts (then no layer is
  preconditioned and every parameter takes the optimizer's documented first-order fallback).
  Per-layer statistics live in the state of the layer's weight (so ``state_dict`` carries them)
  and are kept in fp32 (fp64 for fp64 parameters) whatever the parameter dtype, also after
  ``load_state_dict``.

Every piece of per-layer work (statistics, inverses, preconditioning) takes one layer and its own
state and nothing else; the optimizers loop over layers, so the loop is the seam where a later
version can hand layers to different ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimkit.engine import Optimizer
from optimkit.registry import REFERENCE_LAYER

__all__ = [
    "Layer",
    "LayerCapture",
    "CurvatureOptimizer",
    "find_layers",
    "statistics_dtype",
]


def statistics_dtype(param: Tensor) -> torch.dtype:
    """fp32 statistics for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(param.dtype, torch.float32)


@dataclass(eq=False)
class Layer:
    """One preconditionable layer: ``module`` with its ``weight`` and (trainable) ``bias``."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the matrix form: fan-in, plus one for the bias."""
        return self.weight[0].numel() + (1 if self.bias is not None else 0)

    # --- input side ---------------------------------------------------------------------
    def input_rows(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int, int]:
        """The inputs as rows ``(N*L, fan_in)`` with ``N`` examples and ``L`` positions
        (``L = 1`` for a Linear layer, whose leading dims are all examples)."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(
                x.to(dtype),
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )  # (N, C*kh*kw, L)
            n, k, positions = patches.shape
            return patches.transpose(1, 2).reshape(n * positions, k), n, positions
        rows = x.to(dtype).reshape(-1, x.shape[-1])
        return rows, rows.shape[0], 1

    def with_ones(self, rows: Tensor) -> Tensor:
        """Append the homogeneous coordinate when the layer has a bias."""
        if self.bias is None:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    # --- output side --------------------------------------------------------------------
    def output_grad_rows(self, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, int, int]:
        """Output gradients as rows ``(N*L, d_out)``, with ``N`` and ``L`` as for the inputs."""
        if isinstance(self.module, nn.Conv2d):
            n, c = g.shape[0], g.shape[1]
            rows = g.to(dtype).reshape(n, c, -1).transpose(1, 2)
            positions = rows.shape[1]
            return rows.reshape(n * positions, c), n, positions
        rows = g.to(dtype).reshape(-1, g.shape[-1])
        return rows, rows.shape[0], 1

    # --- gradient in matrix form ------------------------------------------------------------
    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None, dtype) -> Tensor:
        """:math:`[\\nabla W, \\nabla b]` as a ``(d_out, in_features)`` matrix."""
        mat = weight_grad.to(dtype).reshape(self.out_features, -1)
        if self.bias is not None:
            mat = torch.cat([mat, bias_grad.to(dtype).reshape(-1, 1)], dim=1)
        return mat

    def split(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`grad_matrix`: weight-shaped and bias-shaped pieces."""
        if self.bias is None:
            return mat.reshape(self.weight.shape), None
        return mat[:, :-1].reshape(self.weight.shape), mat[:, -1].reshape(self.bias.shape)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (
            module.groups == 1
            and not isinstance(module.padding, str)
            and module.padding_mode == "zeros"
        )
    return False


def find_layers(model: nn.Module, params: Iterable[Tensor]) -> list[Layer]:
    """Supported layers of ``model`` whose weight is trainable and among ``params``. A bias
    that is frozen or not among ``params`` is left out of the layer (no homogeneous
    coordinate)."""
    wanted = {id(p) for p in params}
    layers = []
    for module in model.modules():
        if not _supported(module):
            continue
        weight = module.weight
        if not weight.requires_grad or id(weight) not in wanted:
            continue
        bias = module.bias
        if bias is not None and (not bias.requires_grad or id(bias) not in wanted):
            bias = None
        layers.append(Layer(module, weight, bias))
    return layers


class LayerCapture:
    """Forward hooks keeping each layer's last input and the gradient of its last output."""

    def __init__(self, layers: list[Layer]) -> None:
        self.inputs: dict[int, Tensor] = {}
        self.grad_outputs: dict[int, Tensor] = {}
        self._handles = [
            layer.module.register_forward_hook(self._hook(index))
            for index, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def forward_hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if not output.requires_grad:
                return
            self.inputs[index] = inputs[0].detach()
            self.grad_outputs.pop(index, None)

            def grad_hook(grad: Tensor) -> None:
                self.grad_outputs[index] = grad.detach()

            output.register_hook(grad_hook)

        return forward_hook

    def get(self, index: int) -> tuple[Tensor, Tensor] | None:
        """``(input, output gradient)`` of the layer's last pass, or None when incomplete."""
        if index in self.inputs and index in self.grad_outputs:
            return self.inputs[index], self.grad_outputs[index]
        return None

    def clear(self) -> None:
        self.inputs.clear()
        self.grad_outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


#: elements of each per-layer state entry for a layer with ``rows`` inputs (bias included)
#: and ``cols`` outputs
_LAYER_STATE_NUMEL = {
    "A": lambda rows, cols: rows * rows,
    "A_inv": lambda rows, cols: rows * rows,
    "G": lambda rows, cols: cols * cols,
    "G_inv": lambda rows, cols: cols * cols,
    "H": lambda rows, cols: rows,
    "S": lambda rows, cols: cols,
}


class CurvatureOptimizer(Optimizer):
    """Base class of the model-aware optimizers (see the module docstring).

    Args:
        model_or_params: an ``nn.Module`` (its layers are preconditioned) or an iterable of
            tensors / param-group dicts (no layer is preconditioned).
        lr, impl, **hyperparams: as for every optimkit optimizer.
    """

    impls: ClassVar[tuple[str, ...]] = ("reference",)
    supports_complex: ClassVar[bool] = False
    weight_decay_mode: ClassVar[str | None] = None
    #: per-layer state entries kept in the statistics dtype (not cast to the parameter dtype)
    layer_state_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_state_bytes(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """Bytes per element of the parameter-shaped state (e.g. a momentum buffer)."""
        return 0.0

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """Bytes per parameter element at the registry's reference layer ``nn.Linear(48, 64)``:
        the parameter-shaped state plus the layer's factors (in fp32, or fp64 for fp64)."""
        d_in, d_out = REFERENCE_LAYER
        rows = d_in + 1  # the bias column
        numel = d_in * d_out + d_out
        stat_itemsize = max(torch.empty((), dtype=dtype).element_size(), 4)
        layer = sum(_LAYER_STATE_NUMEL[key](rows, d_out) for key in cls.layer_state_keys)
        return cls.param_state_bytes(hp, dtype) + layer * stat_itemsize / numel

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor | None = None,
        *,
        impl: str | None = None,
        **hyperparams: Any,
    ) -> None:
        model = model_or_params if isinstance(model_or_params, nn.Module) else None
        params = model.parameters() if model is not None else model_or_params
        super().__init__(params, lr, impl=impl, **hyperparams)
        mine = [p for group in self.param_groups for p in group["params"]]
        self.layers: list[Layer] = find_layers(model, mine) if model is not None else []
        self._capture = LayerCapture(self.layers)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model."""
        self._capture.remove()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{type(self).__name__}: {message}", RuntimeWarning, stacklevel=4)

    def _record_failure(self, state: dict[str, Any], message: str) -> None:
        """Count a failed or non-finite statistic/inverse in ``state['curvature_failures']``."""
        state["curvature_failures"] = state.get("curvature_failures", 0) + 1
        self._warn_once("failure", message + " (counted in state['curvature_failures'])")

    @staticmethod
    def _init_step(state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)

    # ------------------------------------------------------------------------------------
    def state_dtype(self, key: str, param: Tensor) -> torch.dtype | None:
        """Per-layer statistics keep the statistics dtype (fp32, or fp64 for fp64 weights)."""
        return statistics_dtype(param) if key in self.layer_state_keys else None

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        if "step" not in state and state:
            raise ValueError(f"{type(self).__name__}: a loaded parameter state has no 'step'")


def layer_hyperparams(
    optimizer: CurvatureOptimizer, groups: Mapping[int, dict[str, Any]], layer: Layer
) -> dict[str, Any]:
    """The hyperparameters of the group holding the layer's weight."""
    return optimizer.group_hyperparams(groups[id(layer.weight)])
