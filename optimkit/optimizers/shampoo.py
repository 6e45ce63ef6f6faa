r"""Shampoo with blocking, grafting and delayed, infrequent inverse roots.

Paper: R. Anil, V. Gupta, T. Koren, K. Regan, Y. Singer, "Scalable Second Order Optimization
for Deep Learning", arXiv:2002.09018. Authors' code: google-research/google-research
``scalable_shampoo/pytorch`` (``shampoo.py``, ``matrix_functions.py``), whose defaults and
epsilon handling we follow; deviations from that port are named in :class:`Shampoo`.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import is_
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    COEFFICIENT,
    MAXIMIZE,
    NON_NEGATIVE,
    UNIT,
    Choice,
    Flag,
    Hyper,
    Interval,
    Optimizer,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.kernels import triton_on
from optimkit.linalg import (
    accumulate_gram_,
    inverse_root_coupled_newton,
    inverse_root_eigh,
    matmul_accumulate_,
)
from optimkit.optimizers._refresh import RefreshCounts
from optimkit.optimizers._stacked import StateViews
from optimkit.optimizers.muon import apply_update
from optimkit.registry import REFERENCE_SHAPES, Paper, register

__all__ = ["Shampoo", "merge_small_dims", "block_slices"]

AUTHORS = "google-research scalable_shampoo/pytorch"


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """The authors' ``_merge_small_dims``: collapse consecutive dims while their product stays
    ``<= max_dim``, dropping size-1 dims (``[1, 2, 768, 1, 2048] -> [2, 768, 2048]``)."""
    merged: list[int] = []
    product = 1
    for size in shape:
        if product * size <= max_dim:
            product *= size
        else:
            if product > 1:
                merged.append(product)
            product = size
    if product > 1:
        merged.append(product)
    return tuple(merged)


def block_slices(shape: tuple[int, ...], block_size: int) -> list[tuple[slice, ...]]:
    """Index of every block of a tensor of ``shape`` split into ``block_size`` pieces along
    each dim larger than ``block_size`` (the last piece holds the remainder), in the authors'
    ``BlockPartitioner`` order (row-major over the block grid)."""
    per_dim = []
    for size in shape:
        if block_size > 0 and size > block_size:
            per_dim.append(
                [slice(s, min(s + block_size, size)) for s in range(0, size, block_size)]
            )
        else:
            per_dim.append([slice(0, size)])
    return [tuple(index) for index in itertools.product(*per_dim)]


def _statistics_weight(beta2: float) -> float:
    """The gradient's weight in the statistics: 1 (AdaGrad sums) for ``beta2 == 1``, else
    ``1 - beta2`` (an exponential moving average), as in the authors' code."""
    return 1.0 if beta2 == 1.0 else 1.0 - beta2


def _global_precision() -> str:
    """The statistics' products follow torch's global TF32 switch, like every other product
    of this Shampoo (``torch.backends.cuda.matmul.allow_tf32``; off by default)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


@dataclass
class _MatrixBlocks:
    """The blocks of one matrix parameter whose dims split evenly into blocks (the usual case:
    2048 x 5504 in blocks of 128): its per-block statistics and roots, which stay separate
    state entries (``stat{b}_{i}``, ``root{b}_{i}``: checkpoints are unchanged), live as
    views of four ``(blocks, n, n)`` stacks (slices of a :class:`_BlockArena`'s), so that
    every block is updated and preconditioned by batched products instead of a Python loop
    over blocks."""

    grid: tuple[int, int]  # blocks along rows and columns
    size: tuple[int, int]  # rows and columns of a block
    stats: tuple[Tensor, Tensor]
    roots: tuple[Tensor, Tensor]
    views: tuple[Tensor, ...]  # every per-block entry
    keys: tuple[str, ...]  # their state keys, in the same order
    held: StateViews  # the entries in the parameter's state: to notice one replaced

    def view_in(self, state: dict[str, Any]) -> None:
        """Write the per-block entries into ``state`` as this layout's views."""
        state.update(zip(self.keys, self.views))
        self.held = StateViews((state, key, view) for key, view in zip(self.keys, self.views))

    def stack_from(self, state: dict[str, Any]) -> None:
        """Copy the per-block entries of ``state`` into this layout's stacks (one stack at a
        time: its entries are stacked into a temporary first, as some may be its own views)
        and view them there (:meth:`view_in`)."""
        count = self.count
        for j, stack in enumerate((*self.stats, *self.roots)):
            stack.copy_(torch.stack([state[key] for key in self.keys[j * count : (j + 1) * count]]))
        self.view_in(state)

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    def holds(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` is the dict the entries were viewed in and still holds every
        one (none was replaced or removed; a loaded checkpoint makes new dicts)."""
        return self.held.held_by((state,))

    def block_view(self, blocks: Tensor) -> Tensor:
        """``(blocks, rows, cols)`` in ``block_slices`` order -> a ``(r, rows, c, cols)`` view
        of the same memory, indexed as the matrix reshaped to ``(r, rows, c, cols)``."""
        (r, c), (bm, bn) = self.grid, self.size
        return blocks.view(r, c, bm, bn).transpose(1, 2)

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """``(r, rows, c, cols)``: the matrix indexed by block row, row, block column,
        column (a contiguous tensor of the parameter's size views as it)."""
        (r, c), (bm, bn) = self.grid, self.size
        return (r, bm, c, bn)

    def join(self, blocks: Tensor) -> Tensor:
        """``(blocks, rows, cols)`` -> the ``(m, n)`` matrix (a copy)."""
        (r, c), (bm, bn) = self.grid, self.size
        return self.block_view(blocks).reshape(r * bm, c * bn)


@dataclass
class _BlockArena:
    """Every evenly split matrix of a parameter group whose blocks share one size, dtype and
    device, stacked: the statistics and roots of all their blocks are four ``(blocks, n,
    n)`` tensors (each member's :class:`_MatrixBlocks` holds slices of them), so that a step
    updates and preconditions them by a few batched products over runs of members
    (:data:`BATCH_BLOCKS` blocks at most) instead of several launches per parameter, and a
    refresh computes their roots from the stacks themselves, without concatenating them.
    The members' order is the group's."""

    params: tuple[Tensor, ...]
    members: list[_MatrixBlocks]
    offsets: tuple[int, ...]  # each member's first block
    stats: tuple[Tensor, Tensor]
    roots: tuple[Tensor, Tensor]

    def span(self, first: int, end: int) -> slice:
        """The blocks of members ``first .. end - 1``."""
        last = self.members[end - 1]
        return slice(self.offsets[first], self.offsets[end - 1] + last.count)


BATCH_BLOCKS = 4096
"""Most blocks in one batched product of a :class:`_BlockArena` (unless a single matrix has
more): bounds the step's temporaries (two of this many blocks) while keeping launches few
(0.6 B transformer-shaped list, blocks of 128: 37,056 blocks, 10 runs)."""


@functools.lru_cache(maxsize=4096)
def _interpreted(shape: tuple[int, ...], block_size: int, merge: bool) -> tuple[int, ...]:
    """A parameter shape as Shampoo works on it: small dims merged (:func:`merge_small_dims`)
    when ``merge`` (``best_effort_shape_interpretation``); remembered, as it is asked for
    every parameter at every step."""
    return merge_small_dims(shape, block_size) if merge else shape


@functools.lru_cache(maxsize=4096)
def _block_layout(
    shape: tuple[int, ...], block_size: int, merge: bool
) -> tuple[tuple, tuple] | None:
    """:func:`_even_grid` of a parameter shape's interpreted shape (remembered)."""
    return _even_grid(_interpreted(shape, block_size, merge), block_size)


def _even_grid(work: tuple[int, ...], block_size: int) -> tuple[tuple, tuple] | None:
    """(grid, block size) of a 2-D work shape that splits evenly into blocks, else None."""
    if len(work) != 2 or any(d > block_size and d % block_size for d in work):
        return None
    grid = tuple(d // block_size if d > block_size else 1 for d in work)
    size = tuple(block_size if d > block_size else d for d in work)
    return grid, size


def precondition_block(block: Tensor, roots: list[Tensor]) -> Tensor:
    r""":math:`G \times_1 L_1^{-1/p} \times_2 \cdots \times_k L_k^{-1/p}` (for a matrix,
    :math:`L^{-1/4} G R^{-1/4}`)."""
    out = block
    for root in roots:  # contracting axis 0 each time cycles the axes back into place
        out = torch.tensordot(out, root, dims=([0], [0]))
    return out


@register(
    paper=Paper(
        "Scalable Second Order Optimization for Deep Learning",
        "2002.09018",
        2020,
        "Anil, Gupta, Koren, Regan, Singer",
    ),
    category="second-order",
    shape_aware=True,
    verified_against=(
        "fp64 reference (exact roots by eigh, per-block loop)",
        "google-research scalable_shampoo/pytorch rules (re-implemented in test)",
    ),
    battery={"hp": {"lr": 0.1}},
)
class Shampoo(RefreshCounts, Optimizer):
    r"""Shampoo: Kronecker-factored AdaGrad preconditioning per tensor block, with grafting.

    A parameter is reshaped (``best_effort_shape_interpretation``: small consecutive dims
    merged, :func:`merge_small_dims`) to a rank-:math:`k` tensor and cut into blocks of at most
    ``block_size`` along each dim. For each block :math:`G` and each axis :math:`i`:

    .. math::
        L_i \leftarrow \beta_2 L_i + w\,G_{(i)}G_{(i)}^\top\quad
        (w = 1 \text{ if } \beta_2 = 1 \text{ else } 1-\beta_2;\ L_i^{(0)} = \epsilon I),

        P_i = (L_i + \epsilon\,\lambda_{max}(L_i)\,I)^{-1/p},\quad p = 2k
        \ (\text{or } \texttt{inverse\_exponent\_override}),

        \tilde G = G \times_1 P_1 \cdots \times_k P_k \quad(\text{a matrix: } L^{-1/4} G R^{-1/4}),

    the roots recomputed every ``preconditioning_compute_steps`` steps (by ``eigh``, or by the
    coupled Newton iteration with ``root_method="newton"``, as the authors' ``ComputePower``).
    Grafting takes the direction from Shampoo and the per-tensor norm from a diagonal method
    :math:`D` (``graft``: ``"sgd"`` :math:`D = g`, ``"adagrad"``
    :math:`D = g/(\sqrt{\sum g^2} + \epsilon_d)`, ``"adam"``
    :math:`D = g/(\sqrt{v/(1-\beta_g^t)} + \epsilon_d)` with
    :math:`v \leftarrow \beta_g v + (1-\beta_g)g^2`, ``"none"``: no rescaling):

    .. math::
        d = \tilde G\,\frac{\|D\|}{\|\tilde G\| + 10^{-16}} + \lambda\theta,\qquad
        m \leftarrow \mu m + d,\qquad
        \theta \leftarrow \theta - \eta\,(\mu m + d)\ \text{(Nesterov) or}\ \theta - \eta m.

    Before ``start_preconditioning_step`` the direction is :math:`D` itself. Tensors of
    (interpreted) rank < 2 are not preconditioned (:math:`\tilde G = g`, still grafted).

    Defaults are the authors' PyTorch port (``ShampooHyperParams``): lr 1.0, momentum 0.9,
    Nesterov, :math:`\beta_2` 1.0 (a sum, as AdaGrad and the paper's Algorithm), diagonal eps
    1e-6, matrix eps 1e-12 (both the initial :math:`\epsilon I` and the relative ridge
    :math:`\epsilon\lambda_{max}`, "epsilon handling as in the paper's code"), block size 128,
    start step 1, roots every step, SGD grafting. ``graft_beta2`` 0.999 for Adam grafting is
    Distributed Shampoo's default (facebookresearch/optimizers).

    Deviations from the authors' PyTorch port, named: (1) one momentum buffer: the port keeps a
    second (graft) momentum of the *raw* gradient used before the start step and, with
    Nesterov, writes :math:`\mu m + d` back into the momentum buffer in place; we follow the
    paper/JAX semantics (Nesterov look-ahead not stored; before the start step the graft
    direction :math:`D` feeds the single momentum); (2) Adam grafting added (the port has
    SGD/AdaGrad); (3) default roots by ``eigh`` (exact, eigenvalues clamped at 0) instead of the
    coupled Newton iteration (``root_method="newton"`` gives the port's; its power iteration
    starts from a fixed vector instead of a random one); (4) a 1x1 statistic's root is 1, as
    in the port; (5) fp32 statistics for bf16/fp16 parameters; (6) a failed or non-finite root
    keeps the previous one (identity at first), warns once and is counted in
    ``state["root_failures"]``; (7) same-sized roots of a group are computed in one batched
    call. ``statistics_compute_steps`` is not offered (statistics every step).

    State: ``momentum`` (parameter-shaped); the graft's ``graft_sum_sq`` / ``graft_exp_avg_sq``
    (parameter-shaped) for AdaGrad/Adam grafting; per block ``b`` and axis ``i``: ``stat{b}_{i}``
    and ``root{b}_{i}`` (:math:`n_i \times n_i`). Bytes per element:
    :math:`4\,(N(1 + [\text{graft has state}]) + \sum_{blocks,i} 2 n_i^2)/N`; reported at the
    reference shapes [64x48, 48]: 20.41 for the defaults.

    Speed: the matrices of a group whose dims split evenly into blocks of one size (e.g.
    2048 x 2048 and 2048 x 5504 in blocks of 128) keep their per-block statistics and roots
    as views of one set of stacked tensors (an arena), so that a step cuts the gradients into
    blocks, updates the statistics and preconditions them by a few batched products over runs
    of parameters (:data:`BATCH_BLOCKS` blocks at most, which bounds the temporaries) instead
    of several launches per parameter, and a refresh computes the roots from the stacks
    themselves; the preconditioned blocks are not copied back into matrices (the momentum and
    the weights are viewed in the blocks' indexing). Other tensors take a loop over their
    blocks, the roots of every same-sized block among them computed in one batched call. On a
    GPU,
    ``root_method="newton"`` (the authors' iteration: batched matrix products) is far faster
    than ``"eigh"`` (torch's batched ``eigh`` of 128 x 128 matrices runs one matrix at a time).
    The elementwise rest of the step (grafting, weight decay, momentum, the update) runs as
    multi-tensor ops over the group, and on CUDA the power iteration for each block's largest
    eigenvalue is a Triton kernel (:mod:`optimkit.kernels.power_iteration`: each matrix read
    once, not once a round), and the Newton iteration lets each block stop at its own
    convergence (the batch is compacted once at most half of it still iterates).
    ``optimkit bench speed-matrix --spectrum decaying`` on a 0.6 B transformer-shaped list
    with ``root_method="newton"``, roots every 10 steps: on an NVIDIA H200, 2026-12-07
    (evening), 59.4 ms/step (median 33.5 ms, the refresh step 0.31 s), 2.04x its floor,
    against 65.6 ms/step for the code before the compaction in the same call; on NVIDIA
    H100s earlier that day: 64.4 and 75.2 ms/step on two machines (median 29.4 and 41.2 ms, the
    refresh step 0.37-0.38 s), 2.04x and 2.40x the fp32 matmul work it runs (statistics,
    preconditioning and the roots' products, counted in
    ``opt.refresh_counts["root_matmul_flops"]``); the code before the arena and the fused
    tail took 103.1 ms/step on the second machine in the same call, and 76.5 on a third one
    (70.1 with them). The regular step is partly bound by the host, so it varies with the
    machine's CPU.
    """

    hyperparams = {
        "lr": lr_hyper(1.0, AUTHORS),
        "momentum": Hyper(0.9, COEFFICIENT, AUTHORS),
        "nesterov": Hyper(True, Flag(), AUTHORS),
        "beta2": Hyper(1.0, Interval(0.0, 1.0, low_open=True), AUTHORS),
        "diagonal_eps": Hyper(1e-6, NON_NEGATIVE, AUTHORS),
        "matrix_eps": Hyper(1e-12, NON_NEGATIVE, AUTHORS),
        "weight_decay": weight_decay_hyper(0.0, AUTHORS),
        "inverse_exponent_override": Hyper(0, Interval(0, integer=True), AUTHORS),
        "start_preconditioning_step": Hyper(1, Interval(1, integer=True), AUTHORS),
        "preconditioning_compute_steps": Hyper(1, Interval(1, integer=True), AUTHORS),
        "block_size": Hyper(128, Interval(1, integer=True), AUTHORS),
        "best_effort_shape_interpretation": Hyper(True, Flag(), AUTHORS),
        "graft": Hyper("sgd", Choice(("sgd", "adagrad", "adam", "none")), AUTHORS),
        "graft_beta2": Hyper(0.999, UNIT, "Distributed Shampoo AdamGraftingConfig"),
        "root_method": Hyper("eigh", Choice(("eigh", "newton")), "eigh: exact; newton: authors'"),
        "maximize": MAXIMIZE,
    }
    impls = ("reference",)
    supports_complex = False
    weight_decay_mode = None  # coupled, added after grafting (authors' order)

    # ------------------------------------------------------------------------------------
    @staticmethod
    def interpreted_shape(shape: tuple[int, ...], hp: Mapping[str, Any]) -> tuple[int, ...]:
        return _interpreted(tuple(shape), hp["block_size"], hp["best_effort_shape_interpretation"])

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """Bytes/element at the reference shapes [64x48, 48] (the battery's); formula in the
        class docstring."""
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
        per_param = 2 if full["graft"] in ("adagrad", "adam") else 1
        elements = numel = 0
        for shape in REFERENCE_SHAPES:
            n = 1
            for size in shape:
                n *= size
            numel += n
            elements += per_param * n
            work = cls.interpreted_shape(shape, full)
            if len(work) >= 2:
                for index in block_slices(work, full["block_size"]):
                    elements += sum(2 * (s.stop - s.start) ** 2 for s in index)
        return elements * itemsize / numel

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype:
        """Statistics, bases and moments are kept in at least fp32, also for bf16 weights."""
        return torch.promote_types(param.dtype, torch.float32)

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        super()._upgrade_state(state)
        state.setdefault("root_failures", 0)

    # ------------------------------------------------------------------------------------
    def _init_state(self, p: Tensor, state: dict, hp: Mapping, work: tuple[int, ...]) -> None:
        dtype = torch.promote_types(p.dtype, torch.float32)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["root_failures"] = 0
        state["momentum"] = torch.zeros_like(p, dtype=dtype)
        if hp["graft"] == "adagrad":
            state["graft_sum_sq"] = torch.zeros_like(p, dtype=dtype)
        elif hp["graft"] == "adam":
            state["graft_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if len(work) < 2:
            return
        for b, index in enumerate(block_slices(work, hp["block_size"])):
            for i, s in enumerate(index):
                n = s.stop - s.start
                eye = torch.eye(n, dtype=dtype, device=p.device)
                state[f"stat{b}_{i}"] = hp["matrix_eps"] * eye
                state[f"root{b}_{i}"] = eye.clone()

    def update_block_statistics(self, block: Tensor, stats: list[Tensor], beta2: float) -> None:
        """Accumulate one block's per-axis statistics (independent of every other block)."""
        weight, precision = _statistics_weight(beta2), _global_precision()
        for i, stat in enumerate(stats):
            accumulate_gram_(stat, block, i, beta2, weight, precision)

    def compute_block_roots(
        self, stats: Tensor, exponent: int, hp: Mapping
    ) -> tuple[Tensor, Tensor]:
        """Inverse ``exponent``-th roots of a stack of same-sized statistics: ``(roots, ok)``.
        One independent problem per matrix: the seam for spreading blocks across ranks."""
        if stats.size(-1) == 1:  # the authors' ComputePower returns the identity for 1x1
            ok = torch.ones(stats.shape[:-2], dtype=torch.bool, device=stats.device)
            return torch.ones_like(stats), ok
        if hp["root_method"] == "newton":
            return inverse_root_coupled_newton(
                stats, exponent, hp["matrix_eps"], counts=self.refresh_counts
            )
        return inverse_root_eigh(stats, exponent, hp["matrix_eps"])

    def _step_group(self, group: dict[str, Any]) -> None:
        hp = self.group_hyperparams(group)
        items: list[_Pending] = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Shampoo does not support sparse gradients")
            state = self.state[p]
            work = self.interpreted_shape(tuple(p.shape), hp)
            if "step" not in state:
                self._init_state(p, state, hp, work)
            state["step"] += 1
            t = int(state["step"].item())
            dtype = state["momentum"].dtype
            grad = (-grad if hp["maximize"] else grad).to(dtype)
            if hp["graft"] == "adagrad":
                state["graft_sum_sq"].addcmul_(grad, grad)
            elif hp["graft"] == "adam":
                beta = hp["graft_beta2"]
                state["graft_exp_avg_sq"].mul_(beta).addcmul_(grad, grad, value=1 - beta)
            items.append(_Pending(p, grad, state, t, work))
        if not items:
            return
        members = {
            id(p): (arena, k)
            for arena in self._arenas(group, hp)
            for k, p in enumerate(arena.params)
        }
        requests: dict[tuple, list[tuple[dict, Tensor, Callable]]] = {}
        present: dict[int, tuple[_BlockArena, list[tuple[int, _Pending]]]] = {}
        for item in items:
            found = members.get(id(item.param))
            if found is not None:
                arena, k = found
                present.setdefault(id(arena), (arena, []))[1].append((k, item))
            elif len(item.work) >= 2:
                self._loop_statistics(item, hp, requests)
        runs = [
            run
            for arena, entries in present.values()
            for run in self._arena_statistics(arena, entries, hp)
        ]
        self._refresh_roots(requests, hp)
        for arena, entries in present.values():
            self._refresh_arena_roots(arena, entries, hp)
        for arena, first, end, blocks, entries in runs:
            if any(item.step >= hp["start_preconditioning_step"] for _, item in entries):
                span = arena.span(first, end)
                left, right = arena.roots[0][span], arena.roots[1][span]
                torch.bmm(torch.bmm(left.transpose(1, 2), blocks), right, out=blocks)
        self._apply(items, hp)

    def _loop_statistics(self, item: _Pending, hp: Mapping, requests: dict) -> None:
        """Statistics of a tensor outside every :class:`_BlockArena` (blocks of several sizes,
        or of rank above 2), block by block, and its root requests when it refreshes."""
        item.blocks = block_slices(item.work, hp["block_size"])
        shaped = item.grad.reshape(item.work)
        exponent = hp["inverse_exponent_override"] or 2 * len(item.work)
        refresh = item.step % hp["preconditioning_compute_steps"] == 0
        state = item.state
        for b, index in enumerate(item.blocks):
            stats = [state[f"stat{b}_{i}"] for i in range(len(item.work))]
            self.update_block_statistics(shaped[index], stats, hp["beta2"])
            if refresh:
                for i, s in enumerate(index):
                    requests.setdefault((s.stop - s.start, exponent), []).append(
                        (state, stats[i][None], _write_roots(state[f"root{b}_{i}"][None]))
                    )

    def _refresh_roots(self, requests: dict, hp: Mapping) -> None:
        """The roots of the loop-path blocks that refresh, every same-sized one of the group in
        one batched call; a failed root keeps its previous value."""
        for (_, exponent), entries in requests.items():
            stack = torch.cat([stats for _, stats, _ in entries])
            roots, ok = self.compute_block_roots(stack, exponent, hp)
            start, failed = 0, []
            for _, stats, write in entries:
                count = len(stats)
                good = ok[start : start + count]
                write(roots[start : start + count], good)
                failed.append(count - good.sum())
                start += count
            for (state, _, _), failures in zip(entries, torch.stack(failed).tolist()):
                self._record_failure(state, int(failures))  # one read-back per block size

    def _arena_statistics(
        self, arena: _BlockArena, entries: list[tuple[int, _Pending]], hp: Mapping
    ) -> list[tuple[_BlockArena, int, int, Tensor, list[tuple[int, _Pending]]]]:
        """The gradients of the arena's members that have one, cut into blocks (one copy into
        a buffer per run of consecutive members, :data:`BATCH_BLOCKS` blocks at most) and
        their statistics updated by two batched products a run. Returns the runs ``(arena,
        first, end, blocks, entries)``; ``blocks`` later holds the preconditioned blocks
        (and each member's ``item.direction_blocks`` its slice of them)."""
        out = []
        for run in _consecutive_runs(arena, entries, BATCH_BLOCKS):
            first, end = run[0][0], run[-1][0] + 1
            span = arena.span(first, end)
            bm, bn = arena.members[first].size
            blocks = arena.stats[0].new_empty((span.stop - span.start, bm, bn))
            targets, sources = [], []
            for k, item in run:
                member, start = arena.members[k], arena.offsets[k] - span.start
                if not member.holds(item.state):  # an entry replaced from outside
                    _restack(arena, k, item.state)
                item.member = member
                item.direction_blocks = blocks[start : start + member.count]
                targets.append(member.block_view(item.direction_blocks))
                sources.append(item.grad.reshape(member.grid_shape))
            torch._foreach_copy_(targets, sources)
            self.update_block_statistics_batched(
                (arena.stats[0][span], arena.stats[1][span]), blocks, hp["beta2"]
            )
            out.append((arena, first, end, blocks, run))
        return out

    def _refresh_arena_roots(
        self, arena: _BlockArena, entries: list[tuple[int, _Pending]], hp: Mapping
    ) -> None:
        """The roots of the arena's members that refresh this step, one batched call per run
        of consecutive members and axis, computed from and written into the stacks (no
        copy of them); a failed root keeps its previous value."""
        due = [
            (k, item) for k, item in entries if item.step % hp["preconditioning_compute_steps"] == 0
        ]
        exponent = hp["inverse_exponent_override"] or 4
        for run in _consecutive_runs(arena, due):
            span = arena.span(run[0][0], run[-1][0] + 1)
            counts = [arena.members[k].count for k, _ in run]
            failed = []
            for i in range(2):
                roots, ok = self.compute_block_roots(arena.stats[i][span], exponent, hp)
                _write_roots(arena.roots[i][span])(roots, ok)
                failed.append(torch.stack([(~good).sum() for good in ok.split(counts)]))
            for (_, item), failures in zip(run, sum(failed).tolist()):  # one read-back
                self._record_failure(item.state, int(failures))

    def update_block_statistics_batched(
        self, stats: tuple[Tensor, Tensor], blocks: Tensor, beta2: float
    ) -> None:
        """:meth:`update_block_statistics` for a stack of blocks at once (batched ``G G^T``
        into ``stats[0]`` and ``G^T G`` into ``stats[1]``)."""
        weight, precision = _statistics_weight(beta2), _global_precision()
        transposed = blocks.transpose(1, 2)
        matmul_accumulate_(stats[0], blocks, transposed, beta2, weight, precision)
        matmul_accumulate_(stats[1], transposed, blocks, beta2, weight, precision)

    def _arenas(self, group: dict[str, Any], hp: Mapping) -> list[_BlockArena]:
        """The group's :class:`_BlockArena` s (one per block size, dtype and device of its
        evenly split matrices that have state), built on first use or when the members
        change. Whether each member's per-block entries are still the arena's views is
        checked where its gradient is cut into blocks (:meth:`_arena_statistics`), so that the
        GPU starts on the first run while the host checks the next ones."""
        kinds: dict[tuple, list[tuple[Tensor, tuple, tuple]]] = {}
        for p in group["params"]:
            state = self.state.get(p)
            if not state or "momentum" not in state:
                continue
            layout = _block_layout(
                tuple(p.shape), hp["block_size"], hp["best_effort_shape_interpretation"]
            )
            if layout is not None:
                kind = (layout[1], state["momentum"].dtype, p.device)
                kinds.setdefault(kind, []).append((p, *layout))
        cache = self.__dict__.setdefault("_shampoo_arenas", {})
        live = {id(g) for g in self.param_groups}
        for key in [
            k for k in cache if k[0] not in live or (k[0] == id(group) and k[1] not in kinds)
        ]:
            del cache[key]  # a replaced group's or a vanished kind's stacks are not kept alive
        arenas = []
        for kind, entries in kinds.items():
            params = tuple(p for p, _, _ in entries)
            arena = cache.get((id(group), kind))
            if (
                arena is None
                or len(arena.params) != len(params)
                or not all(map(is_, arena.params, params))
            ):
                arena = cache[(id(group), kind)] = self._build_arena(entries)
            arenas.append(arena)
        return arenas

    def _build_arena(self, entries: list[tuple[Tensor, tuple, tuple]]) -> _BlockArena:
        """Stack the per-block entries of ``entries`` (params with their block grid and size)
        and replace every entry by its view."""
        counts = [grid[0] * grid[1] for _, grid, _ in entries]
        offsets = tuple(itertools.accumulate([0, *counts[:-1]]))
        like = self.state[entries[0][0]]["momentum"]
        size = entries[0][2]
        stacks = {
            (kind, i): like.new_empty((sum(counts), size[i], size[i]))
            for kind in ("stat", "root")
            for i in range(2)
        }
        members = []
        for (p, grid, _), offset, count in zip(entries, offsets, counts):
            span = slice(offset, offset + count)
            keys = [f"{kind}{b}_{i}" for kind, i in stacks for b in range(count)]
            views = [stack[offset + b] for stack in stacks.values() for b in range(count)]
            member = _MatrixBlocks(
                grid,
                size,
                (stacks["stat", 0][span], stacks["stat", 1][span]),
                (stacks["root", 0][span], stacks["root", 1][span]),
                tuple(views),
                tuple(keys),
                StateViews(()),
            )
            member.stack_from(self.state[p])
            members.append(member)
        return _BlockArena(
            tuple(p for p, _, _ in entries),
            members,
            offsets,
            (stacks["stat", 0], stacks["stat", 1]),
            (stacks["root", 0], stacks["root", 1]),
        )

    def _record_failure(self, state: dict, count: int = 1) -> None:
        if count <= 0:
            return
        state["root_failures"] = state.get("root_failures", 0) + count
        if not getattr(self, "_warned_root_failure", False):
            self._warned_root_failure = True
            warnings.warn(
                "Shampoo: an inverse root failed or was not finite; the previous root is kept "
                "(counted in state['root_failures'])",
                RuntimeWarning,
                stacklevel=5,
            )

    def _graft_directions(self, items: list[_Pending], hp: Mapping) -> list[Tensor]:
        """The diagonal method's direction :math:`D` of every parameter (``grad`` itself for
        SGD grafting), by multi-tensor ops over the group."""
        grads = [item.grad for item in items]
        if hp["graft"] == "adagrad":
            sums = [item.state["graft_sum_sq"] for item in items]
            denominators = torch._foreach_sqrt(sums)
        elif hp["graft"] == "adam":
            corrections = [1 - hp["graft_beta2"] ** item.step for item in items]
            moments = [item.state["graft_exp_avg_sq"] for item in items]
            denominators = torch._foreach_sqrt(torch._foreach_div(moments, corrections))
        else:
            return grads
        torch._foreach_add_(denominators, hp["diagonal_eps"])
        return torch._foreach_div(grads, denominators)

    def _precondition(self, item: _Pending) -> Tensor:
        r"""Shampoo's direction :math:`\tilde G` of a tensor outside every arena (a new
        tensor): block by block, or the gradient itself below rank 2."""
        if item.blocks:
            shaped = item.grad.reshape(item.work)
            direction = torch.empty_like(shaped)
            for b, index in enumerate(item.blocks):
                roots = [item.state[f"root{b}_{i}"] for i in range(len(item.work))]
                direction[index] = precondition_block(shaped[index], roots)
            return direction.reshape(item.grad.shape)
        return item.grad.clone()

    def _apply(self, items: list[_Pending], hp: Mapping) -> None:
        """Grafting, weight decay, momentum and the update for every parameter of the group
        by multi-tensor ops (a few launches for the whole group instead of a dozen per
        parameter). An arena member's direction stays in its block buffer: on CUDA the
        Triton kernel :mod:`optimkit.kernels.blocked_momentum` reads it there and updates the
        momentum and the weights in one pass; elsewhere the parameter and the momentum are
        viewed in the blocks' ``(r, rows, c, cols)`` indexing for the multi-tensor ops
        instead of the blocks being copied back into a matrix."""
        grafts = self._graft_directions(items, hp)
        params, momenta, directions = [], [], []
        scaled, norm_of, graft_of_scaled = [], [], []
        fused = []  # (member, blocks, param, momentum, index of its scale or None)
        for item, graft in zip(items, grafts):
            param, momentum = item.param, item.state["momentum"]
            if item.step >= hp["start_preconditioning_step"]:
                if item.direction_blocks is not None:
                    member, flat = item.member, item.direction_blocks
                    if _fused_tail_takes(flat, param, momentum):
                        scale = len(norm_of) if hp["graft"] != "none" else None
                        fused.append((member, flat, param, momentum, scale))
                        if scale is not None:
                            norm_of.append(flat)
                            graft_of_scaled.append(graft)
                        continue
                    if param.is_contiguous() and momentum.is_contiguous():
                        direction = member.block_view(flat)
                        param = param.view(member.grid_shape)
                        momentum = momentum.view(member.grid_shape)
                    else:
                        direction = member.join(flat).reshape(item.grad.shape)
                else:
                    direction = flat = self._precondition(item)
                if hp["graft"] != "none":
                    scaled.append((len(norm_of), direction))
                    norm_of.append(flat)
                    graft_of_scaled.append(graft)
            else:
                direction = graft.clone() if graft is item.grad else graft
            params.append(param)
            momenta.append(momentum)
            directions.append(direction)
        scales = None
        if norm_of:  # d = G~ |D| / (|G~| + 1e-16)
            graft_norms = torch.stack(torch._foreach_norm(graft_of_scaled))
            norms = torch.stack(torch._foreach_norm(norm_of))
            scales = graft_norms / (norms + 1e-16)
        if scaled:
            torch._foreach_mul_([d for _, d in scaled], [scales[i] for i, _ in scaled])
        if fused:
            from optimkit.kernels.blocked_momentum import blocked_momentum_update_

            one = None
            for member, flat, param, momentum, index in fused:
                if index is None and one is None:
                    one = torch.ones(1, dtype=flat.dtype, device=flat.device)
                scale = one if index is None else scales[index : index + 1]
                blocked_momentum_update_(
                    flat,
                    param,
                    momentum,
                    scale,
                    member.grid,
                    hp["lr"],
                    hp["momentum"],
                    hp["weight_decay"],
                    hp["nesterov"],
                )
        if not params:
            return
        if hp["weight_decay"] != 0.0:
            weights = [p.to(d.dtype) for p, d in zip(params, directions)]
            torch._foreach_add_(directions, weights, alpha=hp["weight_decay"])
        torch._foreach_mul_(momenta, hp["momentum"])
        torch._foreach_add_(momenta, directions)
        if hp["nesterov"]:
            torch._foreach_add_(directions, momenta, alpha=hp["momentum"])
            updates = directions
        else:
            updates = momenta
        same = [i for i, p in enumerate(params) if p.dtype == updates[i].dtype]
        if same:
            torch._foreach_add_(
                [params[i] for i in same], [updates[i] for i in same], alpha=-hp["lr"]
            )
        for p, update in zip(params, updates):  # bf16/fp16 weights, fp32 state
            if p.dtype != update.dtype:
                apply_update(p, update, hp["lr"])


@dataclass(eq=False)
class _Pending:
    """One parameter's work in a step: its gradient (in the state's dtype), state, step
    count and interpreted shape; the loop path's block slices, or its arena member and the
    member's slice of the run's block buffer (its preconditioned blocks once they are
    computed)."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    step: int
    work: tuple[int, ...]
    blocks: list[tuple[slice, ...]] = field(default_factory=list)
    member: _MatrixBlocks | None = None
    direction_blocks: Tensor | None = None


def _restack(arena: _BlockArena, k: int, state: dict[str, Any]) -> None:
    """Member ``k``'s per-block entries of ``state`` copied into the arena's stacks (one of
    them was replaced from outside) and viewed there again."""
    arena.members[k].stack_from(state)


def _consecutive_runs(
    arena: _BlockArena, entries: list[tuple[int, _Pending]], most: int | None = None
) -> list[list[tuple[int, _Pending]]]:
    """``entries`` (arena member indices in increasing order, with their work) cut into runs
    of consecutive members, each of at most ``most`` blocks (unless one member alone has
    more; no bound for None): every run is one slice of the arena's stacks."""
    runs: list[list[tuple[int, _Pending]]] = []
    for k, item in entries:
        run = runs[-1] if runs else None
        if (
            run is None
            or k != run[-1][0] + 1
            or (
                most is not None
                and arena.span(run[0][0], k + 1).stop - arena.offsets[run[0][0]] > most
            )
        ):
            runs.append([(k, item)])
        else:
            run.append((k, item))
    return runs


#: whether an arena member's update may take the Triton kernel on CUDA (tests switch it off).
FUSED_TAIL = True


def _fused_tail_takes(blocks: Tensor, param: Tensor, momentum: Tensor) -> bool:
    """Whether :meth:`Shampoo._apply` updates this arena member by the Triton kernel
    (:data:`FUSED_TAIL`, CUDA, Triton importable, tensors it takes)."""
    if not triton_on(FUSED_TAIL, blocks):
        return False
    from optimkit.kernels.blocked_momentum import takes

    return takes(blocks, param, momentum)


def _write_roots(target: Tensor) -> Callable[[Tensor, Tensor], None]:
    """Store new roots into ``target`` (a stack, or a one-block view) where ``ok``, keeping
    the previous root of a block whose computation failed; in place, so stacked views stay."""

    def write(roots: Tensor, ok: Tensor) -> None:
        if bool(ok.all()):  # the usual case: one pass, no selection
            target.copy_(roots)
        else:
            target.copy_(torch.where(ok[:, None, None], roots.to(target.dtype), target))

    return write
