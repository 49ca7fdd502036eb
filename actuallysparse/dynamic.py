"""Dynamic sparse training: a model sparse from its first step, whose weights move while it trains.

Pruning trains a dense model first and pays the dense cost in full before any saving begins.
Dynamic sparse training keeps a fixed number of weights from the start and moves them: every
``update_every`` steps each sparse layer drops its ``k`` smallest-magnitude stored weights and
regrows ``k`` weights where none is stored, at random (:class:`SET`, Mocanu et al. 2018) or where
the loss gradient of the missing weights is largest (:class:`RigL`, Evci et al. 2020). ``k`` is a
``drop_fraction`` of the layer's stored weights, decayed by a cosine to zero at ``end_step``.

Here the weights, their gradients and the optimizer state are really sparse at every moment:

* :func:`make_sparse` turns a freshly initialised dense model into sparse layers, one layer at a
  time (never two copies of the model), with the ERK or uniform allocation of the weights;
* an update moves entries with :meth:`~actuallysparse.storage.SparseModule.move_entries`: kept
  weights keep their values and optimizer state bit for bit, new ones start at zero, and each
  layer's number of stored weights is exactly preserved;
* RigL's gradient of the missing weights, ``dy^T x`` over the batch, is computed for a block of
  output rows at a time (:data:`GRADIENT_BLOCK_ELEMENTS` entries at most) and only its best
  candidates are kept, so no dense ``out x in`` gradient or weight ever exists.

Example::

    >>> model = make_sparse(model, 0.9, "erk")              # before the optimizer is made
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> rigl = RigL(model, optimizer, update_every=100, drop_fraction=0.3, end_step=total_steps)
    >>> for x, y in batches:
    ...     loss = F.cross_entropy(model(x), y)
    ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    ...     rigl.step()                                        # after optimizer.step(), every step
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actuallysparse import optim as _optim
from actuallysparse.conv import SparseConv2d
from actuallysparse.converter import with_entries
from actuallysparse.storage import SparseModule, rows_cols_key, sparse_modules

DISTRIBUTIONS = ("erk", "uniform")
# The most entries of a dense gradient block RigL holds at once (4 MiB in float32).
GRADIENT_BLOCK_ELEMENTS = 1 << 20


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be a number in (0, 1), the fraction of weights not stored; got {sparsity!r}")
    return float(sparsity)


def _check_distribution(distribution) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}, got {distribution!r}")
    return distribution


def layer_densities(shapes: list[tuple[int, ...]], sparsity: float, distribution: str = "erk") -> list[float]:
    """The fraction of each layer's weights to store so that ``sparsity`` of them all are not stored.

    ``uniform`` gives every layer ``1 - sparsity``. ``erk`` (Erdős–Rényi-kernel, Evci et al. 2020)
    makes a layer's density proportional to ``sum(shape) / prod(shape)``: small layers and the
    ends of a network keep more; a layer that would exceed density 1 is kept whole and the rest
    share what is left.

    Args:
        shapes: each layer's dense weight shape, ``(out, in)`` or ``(out, in, kh, kw)``.
        sparsity: in ``(0, 1)``, over all the layers' weights together.
        distribution: ``"erk"`` or ``"uniform"``.
    """
    sparsity = _check_sparsity(sparsity)
    _check_distribution(distribution)
    sizes = [math.prod(shape) for shape in shapes]
    if distribution == "uniform":
        return [1.0 - sparsity] * len(shapes)
    budget = (1.0 - sparsity) * sum(sizes)
    raw = [sum(shape) / math.prod(shape) for shape in shapes]
    whole: set[int] = set()
    while True:
        rest = budget - sum(sizes[i] for i in whole)
        scale = rest / sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in whole)
        over = {i for i in range(len(shapes)) if i not in whole and scale * raw[i] > 1}
        if not over:
            return [1.0 if i in whole else scale * raw[i] for i in range(len(shapes))]
        whole |= over


def _random_pattern(n_rows: int, n_cols: int, nnz: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``nnz`` distinct positions of an ``n_rows x n_cols`` matrix, spread over the rows as evenly
    as possible and uniform within each row; built a block of rows at a time."""
    counts = torch.full((n_rows,), nnz // n_rows, dtype=torch.long)
    counts[torch.randperm(n_rows, generator=generator)[:nnz % n_rows]] += 1
    block = max(1, GRADIENT_BLOCK_ELEMENTS // n_cols)
    rows, cols = [], []
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        widest = int(counts[start:stop].max())
        if widest == 0:
            continue
        order = torch.rand(stop - start, n_cols, generator=generator).argsort(dim=1)[:, :widest]
        chosen = torch.arange(widest).unsqueeze(0) < counts[start:stop].unsqueeze(1)
        block_rows = torch.arange(start, stop).unsqueeze(1).expand(-1, widest)
        rows.append(block_rows[chosen])
        cols.append(order[chosen])
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    rows, cols = torch.cat(rows), torch.cat(cols)
    order = torch.argsort(rows * n_cols + cols)
    return rows[order], cols[order]


def make_sparse(model: nn.Module, sparsity: float, distribution: str = "erk", *, layers: list[str] | None = None,
                csr_mode: bool = True, seed: int = 0) -> nn.Module:
    """Replace dense ``nn.Linear`` and ``nn.Conv2d`` layers of a freshly initialised ``model`` by
    sparse ones that store a random ``1 - sparsity`` of their weights (with their initial values).

    Layers are converted one at a time and each dense layer is released before the next is
    converted, so the model is never held twice. Call it before making the optimizer.

    Args:
        model: the model, changed in place (and returned).
        sparsity: in ``(0, 1)``: the fraction of the chosen layers' weights not stored.
        distribution: ``"erk"`` or ``"uniform"`` (see :func:`layer_densities`).
        layers: names of the layers to make sparse (as in ``model.named_modules()``); default:
            every ``nn.Linear`` and ``nn.Conv2d``.
        csr_mode: store the patterns as CSR (else COO).
        seed: seeds the random patterns.

    Returns:
        ``model``, its chosen layers now :class:`~actuallysparse.layers.SparseLayer` and
        :class:`~actuallysparse.conv.SparseConv2d`.

    Raises:
        ValueError: a bad ``sparsity`` or ``distribution``, a named layer that is not an
            ``nn.Linear`` or ``nn.Conv2d``, or no such layer at all.
    """
    sparsity = _check_sparsity(sparsity)
    _check_distribution(distribution)
    modules = dict(model.named_modules())
    if layers is None:
        layers = [name for name, module in modules.items() if type(module) in (nn.Linear, nn.Conv2d)]
    for name in layers:
        if type(modules.get(name)) not in (nn.Linear, nn.Conv2d):
            found = type(modules[name]).__name__ if name in modules else "no such module"
            raise ValueError(f"make_sparse converts nn.Linear and nn.Conv2d layers; {name!r} is {found}")
    if not layers:
        raise ValueError("make_sparse found no nn.Linear or nn.Conv2d layer in the model")
    shapes = [tuple(modules[name].weight.shape) for name in layers]
    densities = layer_densities(shapes, sparsity, distribution)
    generator = torch.Generator().manual_seed(seed)
    for name, shape, density in zip(layers, shapes, densities):
        dense = model.get_submodule(name)
        n_rows, n_cols = shape[0], math.prod(shape[1:])
        nnz = min(n_rows * n_cols, max(1, round(density * n_rows * n_cols)))
        rows, cols = _random_pattern(n_rows, n_cols, nnz, generator)
        weight = dense.weight.detach().reshape(n_rows, n_cols)
        values = weight[rows.to(weight.device), cols.to(weight.device)]
        sparse = with_entries(dense, "csr" if csr_mode else "coo", rows, cols, values)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
        del dense, weight
    return model


@dataclass
class _Batch:
    """What a layer saw on the step before an update: its input and the gradient of its output."""

    inputs: Tensor
    grad_output: Tensor | None = None


class DynamicSparsity:
    """What :class:`SET` and :class:`RigL` share: the schedule, the drop, the move of the entries.

    Args:
        model: a model holding sparse layers (:func:`make_sparse`, or converted and pruned).
        optimizer: the optimizer that trains it; kept weights keep their state, new ones start
            at zero.
        update_every: steps between two updates (``ΔT``; RigL uses 100).
        drop_fraction: the fraction of each layer's stored weights moved at the first update,
            in ``[0, 1]``; it decays by a cosine to zero at ``end_step``.
        end_step: the step after which the pattern no longer changes (RigL: 75 % of training).
        seed: seeds random choices (SET's regrowth).

    Raises:
        ValueError: a model with no sparse layer, a non-positive ``update_every`` or
            ``end_step``, a ``drop_fraction`` outside ``[0, 1]``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, update_every: int = 100,
                 drop_fraction: float = 0.3, end_step: int, seed: int = 0) -> None:
        _optim.check_optimizer(optimizer)
        for name, value in (("update_every", update_every), ("end_step", end_step)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer (steps), got {value!r}")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, numbers.Real) or \
                not 0 <= drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
        self.layers = {name: module for name, module in model.named_modules() if isinstance(module, SparseModule)}
        if not self.layers:
            raise ValueError(f"{type(self).__name__} needs a model with sparse layers (SparseLayer, SparseConv2d); "
                             f"this {type(model).__name__} has none: call make_sparse(model, sparsity) first")
        self.optimizer = optimizer
        self.update_every = int(update_every)
        self.drop_fraction = float(drop_fraction)
        self.end_step = int(end_step)
        self.seed = int(seed)
        self.step_count = 0
        self.updates = 0
        self.moved = 0
        self._hooks = []

    def current_drop_fraction(self, step: int | None = None) -> float:
        """The drop fraction at ``step`` (default: the current one): cosine decay to 0 at ``end_step``."""
        step = self.step_count if step is None else step
        if step >= self.end_step:
            return 0.0
        return self.drop_fraction * (1 + math.cos(math.pi * step / self.end_step)) / 2

    def is_update_step(self, step: int) -> bool:
        """Whether the pattern changes after ``step`` optimizer steps."""
        return step > 0 and step % self.update_every == 0 and step < self.end_step

    def step(self) -> int:
        """Count one training step (call after ``optimizer.step()``); at an update step move the
        weights of every layer. Returns the number of weights moved (0 between updates)."""
        self.step_count += 1
        moved = 0
        if self.is_update_step(self.step_count):
            moved = self.update(self.current_drop_fraction())
        self._prepare_for(self.step_count + 1)
        return moved

    def update(self, fraction: float) -> int:
        """Move ``fraction`` of every layer's stored weights now; returns how many moved in all."""
        moved = 0
        for index, (name, layer) in enumerate(self.layers.items()):
            absent = layer.n_weights - layer.nnz
            k = min(round(fraction * layer.nnz), absent)
            if k <= 0:
                continue
            generator = torch.Generator().manual_seed(
                ((self.seed * 1_000_003 + self.step_count) * 1_009 + index) % (1 << 63))
            new_rows, new_cols = self.regrow(name, layer, k, generator)
            keep = _largest_magnitudes(layer.values.detach(), layer.nnz - k)
            layer.move_entries(keep, new_rows, new_cols, optimizer=self.optimizer)
            moved += k
        self.updates += 1
        self.moved += moved
        return moved

    def regrow(self, name: str, layer: SparseModule, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``k`` positions of ``layer``'s matrix where no weight is stored now, as ``(rows, cols)``."""
        raise NotImplementedError

    def _prepare_for(self, step: int) -> None:
        """Called after each step with the number of the next one (RigL captures its batch)."""

    def remove(self) -> None:
        """Remove the hooks this object put on the model (it then no longer updates correctly)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Positions (ascending) of the ``k`` largest ``scores``; among equal scores the lower
    positions win. A selection, not a sort: one ``kthvalue`` and a few passes over ``scores``
    (a stable sort of a million scores took ~0.1 s, and an update made dozens)."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = torch.kthvalue(scores.cpu(), n - k + 1).values.to(scores.device)
    above = scores > threshold
    ties = torch.nonzero(scores == threshold).flatten()[:k - int(above.sum())]
    chosen = above
    chosen[ties] = True
    return torch.nonzero(chosen).flatten()


def _largest_magnitudes(values: Tensor, n_keep: int) -> Tensor:
    """Positions of the ``n_keep`` largest ``|values|``; ties go to the lower position."""
    return top_k_positions(values.abs(), n_keep)


class SET(DynamicSparsity):
    """Sparse Evolutionary Training (Mocanu et al. 2018): regrow at random where nothing is stored.

    Seeded: the same ``seed`` and the same training give the same patterns.
    """

    def regrow(self, name, layer, k, generator):
        n_rows, n_cols = layer._matrix_shape
        stored = torch.sort(rows_cols_key(*layer._rows_cols(), n_cols).cpu()).values
        chosen = torch.zeros(0, dtype=torch.long)
        absent = n_rows * n_cols - stored.numel()
        while chosen.numel() < k:
            # draw more than needed: a share of the draws hits stored or repeated positions
            draws = torch.randint(0, n_rows * n_cols, (2 * (k - chosen.numel()) * (n_rows * n_cols) // absent + 16,),
                                  generator=generator)
            draws = draws[~torch.isin(draws, stored)]
            chosen = _first_occurrences(torch.cat([chosen, draws]))[:k]
        return chosen // n_cols, chosen % n_cols


def _first_occurrences(keys: Tensor) -> Tensor:
    """The distinct entries of ``keys`` in order of first occurrence."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(keys.numel()), reduce="amin")
    return unique[torch.argsort(first)]


class RigL(DynamicSparsity):
    """Rigged Lottery (Evci et al. 2020): regrow where ``|dL/dw|`` of the missing weights is largest.

    The gradient is that of the batch of the update step: on the step before an update, forward
    hooks keep each sparse layer's input and the gradient of its output (what backward computes
    anyway); :meth:`step` then forms ``dy^T x`` a block of output rows at a time
    (:data:`GRADIENT_BLOCK_ELEMENTS` entries at most) and merges each block's best ``k`` absent
    positions into the best ``k`` so far. Ties go to the lower position (row-major). The batch is
    released after the update.

    Attributes:
        peak_update_bytes: the most an update has held at once beyond the captured batch: one
            gradient block and the candidates (position and score) being merged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches: dict[str, _Batch] = {}
        self._capturing = False
        for name, layer in self.layers.items():
            self._hooks.append(layer.register_forward_hook(self._capture_hook(name)))
        self._prepare_for(1)
        self.peak_update_bytes = 0

    def _prepare_for(self, step: int) -> None:
        self._batches.clear()
        self._capturing = self.is_update_step(step)

    def _capture_hook(self, name: str):
        def capture(layer, inputs, output):
            if not (self._capturing and torch.is_grad_enabled() and output.requires_grad):
                return
            batch = _Batch(inputs[0].detach())
            self._batches[name] = batch

            def keep_grad(grad):
                batch.grad_output = grad.detach()

            # A tensor of its own (on capture steps only): a hook on a view that is later changed
            # in place (an in-place ReLU after a layer whose output is reshaped) would never fire.
            output = output.clone()
            output.register_hook(keep_grad)
            return output
        return capture

    def regrow(self, name, layer, k, generator):
        batch = self._batches.get(name)
        if batch is None or batch.grad_output is None:
            raise RuntimeError(f"RigL needs the gradient of the update step's batch for layer {name!r}, but no "
                               f"forward and backward ran through it since the last step(): call rigl.step() once "
                               f"per training step, after loss.backward() and optimizer.step()")
        n_rows, n_cols = layer._matrix_shape
        stored = rows_cols_key(*layer._rows_cols(), n_cols)
        block_rows = max(1, GRADIENT_BLOCK_ELEMENTS // n_cols)
        # the best k so far, merged with each block's best k: at most one block and 2k candidates
        # are held at once
        best_keys = torch.zeros(0, dtype=torch.long, device=stored.device)
        best_scores = torch.zeros(0, dtype=batch.inputs.dtype, device=stored.device)
        for start in range(0, n_rows, block_rows):
            stop = min(n_rows, start + block_rows)
            block = self._gradient_rows(layer, batch, start, stop).abs().flatten()
            taken = stored[(stored >= start * n_cols) & (stored < stop * n_cols)] - start * n_cols
            block[taken] = -1.0  # below every |gradient|: stored positions are never chosen
            if best_keys.numel() == k:
                # only a score above the k-th best so far can enter (an equal one has a higher
                # position than the one it ties with, and loses)
                candidates = torch.nonzero(block > best_scores.min()).flatten()
            else:
                candidates = torch.arange(block.numel(), device=block.device)
            # earlier blocks first: keys stay ascending, so a tie goes to the lower position
            keys = torch.cat([best_keys, candidates + start * n_cols])
            scores = torch.cat([best_scores, block[candidates]])
            held = block.numel() * block.element_size() + keys.numel() * (keys.element_size() + scores.element_size())
            self.peak_update_bytes = max(self.peak_update_bytes, held)
            del block, candidates
            merged = top_k_positions(scores, k)
            best_keys, best_scores = keys[merged], scores[merged]
        if best_keys.numel() < k or bool((best_scores < 0).any()):
            raise RuntimeError(f"layer {name!r}: fewer than {k} absent positions to regrow")
        return best_keys // n_cols, best_keys % n_cols

    @staticmethod
    def _gradient_rows(layer: SparseModule, batch: _Batch, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the dense weight gradient ``dL/dW`` on the captured batch, as a
        ``(stop - start, columns)`` matrix."""
        grad = batch.grad_output
        if isinstance(layer, SparseConv2d):
            kh, kw, sh, sw, dh, dw, top, bottom, left, right = layer.geometry()
            x = batch.inputs if batch.inputs.dim() == 4 else batch.inputs.unsqueeze(0)
            g = grad if grad.dim() == 4 else grad.unsqueeze(0)
            x = F.pad(x, (left, right, top, bottom))
            block = torch.nn.grad.conv2d_weight(x, (stop - start, layer.in_channels, kh, kw), g[:, start:stop],
                                                stride=(sh, sw), dilation=(dh, dw))
            return block.reshape(stop - start, -1)
        x = batch.inputs.reshape(-1, batch.inputs.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        return g[:, start:stop].t() @ x
