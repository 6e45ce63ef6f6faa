"""Group-level gradient statistics, for rules whose step depends on a whole parameter group.

Most update rules are elementwise or per tensor, and the engine runs them one tensor (reference)
or one bucket of tensors (foreach) at a time. A few rules need one number computed from every
gradient of a param group first: AdaGrad-Norm's single accumulator of squared gradient norms, the
clipping level of Clip-RAdaGradD, the "synced" priority of Adam+CM. :class:`GroupNormOptimizer`
computes the per-tensor norms of the group's (prepared) gradients once per step, in the same way
for every impl path, and hands them to :meth:`GroupNormOptimizer.group_step`, which may put
group-level values into ``hp`` for :meth:`update` to read. So the reference and foreach paths see
the same group statistic and cannot drift apart.

Group-level state (e.g. an accumulator) lives, as in ``torch.optim.LBFGS``, in the state of the
group's first parameter: it is saved and loaded with the checkpoint like any other state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import Optimizer, TensorList, _real_view, _unscale


class GroupNormOptimizer(Optimizer):
    """Base class of optimizers whose step needs the gradient norms of a whole param group."""

    #: group-level state keys, kept in the state of the group's first parameter
    group_state_keys: tuple[str, ...] = ()

    def group_step(self, group: dict[str, Any], norms: Tensor, hp: dict[str, Any]) -> None:
        """Called once per step and group, before any :meth:`update` of that step.

        ``norms`` holds the L2 norm of each prepared gradient (unscaled for GradScaler, after
        ``maximize`` and coupled weight decay) of the group's parameters that have a gradient,
        as a 1-d tensor on the device of the group's first parameter, in its dtype (at least
        float32). Values put in ``hp`` reach :meth:`update`."""
        raise NotImplementedError

    @classmethod
    def needs_group_norms(cls, hp: Mapping[str, Any]) -> bool:
        """Whether a group with these hyperparameters computes the group norms (one read of
        every gradient before the update)."""
        return True

    def group_state(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The state that holds group-level quantities: that of the group's first parameter."""
        return self.state[group["params"][0]]

    @staticmethod
    def scalar_dtype(param: Tensor) -> torch.dtype:
        """Group scalars are kept in at least float32 (float64 for float64 parameters)."""
        real = param.real.dtype if param.is_complex() else param.dtype
        return torch.promote_types(real, torch.float32)

    def _collect(self, group: dict[str, Any], hp: dict[str, Any]):
        # The engine passes this same ``hp`` on to ``update`` for every tensor of the group.
        collected = super()._collect(group, hp)
        params, grads = collected[1], collected[2]
        if params and self.needs_group_norms(hp):
            self.group_step(group, self._grad_norms(group, params, grads, hp), hp)
        return collected

    def _grad_norms(self, group, params, grads, hp) -> Tensor:
        first = group["params"][0]
        device, dtype = first.device, self.scalar_dtype(first)
        params = [_real_view(p) for p in params]
        grads = [_real_view(g) for g in grads]
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        if grad_scale is not None:
            grads = _unscale(TensorList(grads), grad_scale).tensors
        weight_decay = hp.get("weight_decay", 0.0)
        if weight_decay != 0 and self._weight_decay_mode(hp) == "coupled":
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if (self.impl or "foreach") == "reference":
            norms = [torch.linalg.vector_norm(g) for g in grads]
        else:
            norms = torch._foreach_norm(grads)
        return torch.stack([n.to(device, dtype) for n in norms])

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype | None:
        """A group scalar keeps its own precision (at least float32) through checkpoints."""
        if key in self.group_state_keys:
            return self.scalar_dtype(param)
        return super().state_dtype(key, param)

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        # The first parameter of a group may hold group-level state without ever having had a
        # gradient itself (then it has no step counter).
        if "step" not in state and any(key in state for key in self.group_state_keys):
            return
        super()._upgrade_state(state)
