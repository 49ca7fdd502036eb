"""Benchmark rows of dynamic sparse training (``python -m actuallysparse.bench --dynamic``).

For a 4096x4096 layer and the whole VGG11_bn (CIFAR head), at 0.9, B=64, Adam, each timed in
one process:

* ``dense``: the dense model's training step (the reference);
* ``sparse``: the fixed-pattern sparse step (:func:`~actuallysparse.dynamic.make_sparse`, no moves);
* ``rigl``: the same with :class:`~actuallysparse.dynamic.RigL` moving weights every
  ``update_every`` steps, amortised: ``((ΔT - 1) * step + capture step + update) / ΔT``, where the
  capture step is the step before an update (its batch is kept) and the update is timed alone;
* ``masked_rigl``: the way the public RigL ports train: a dense weight times a mask in every
  forward, dense gradients and optimizer state, and an update that ranks the dense weight and
  the dense gradient; amortised the same way.

Bytes are those held while training with Adam after one step (every tensor, gradients, Adam's
moments), from :func:`actuallysparse.memory.stored_bytes`. ``update_peak_bytes`` is the most a
RigL update holds at once beyond the batch it kept: one block of the missing weights' gradient
and the candidates being merged (:attr:`~actuallysparse.dynamic.RigL.peak_update_bytes`).
"""
from __future__ import annotations

import copy
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from actuallysparse.dynamic import RigL, make_sparse
from actuallysparse.memory import MIB, stored_bytes
from actuallysparse.timing import optimizer_step_call, ratio_cell, summarise_rounds, time_block, time_interleaved

UPDATE_EVERY = 100
DROP_FRACTION = 0.3
VARIANTS = ("dense", "sparse", "rigl", "masked_rigl")


class MaskedLinearOrConv(nn.Module):
    """A dense layer computing with ``weight * mask`` (the public RigL ports' layer)."""

    def __init__(self, layer: nn.Module, density: float, generator: torch.Generator) -> None:
        super().__init__()
        self.layer = layer
        scores = torch.rand(layer.weight.numel(), generator=generator)
        mask = torch.zeros_like(layer.weight).flatten()
        mask[scores.topk(round(density * scores.numel())).indices] = 1
        self.register_buffer("mask", mask.reshape(layer.weight.shape))
        with torch.no_grad():
            layer.weight.mul_(self.mask)

    def forward(self, x):
        weight = self.layer.weight * self.mask
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        """Drop the smallest stored magnitudes, regrow the largest dense gradients where the mask is 0."""
        mask, weight, grad = self.mask.flatten(), self.layer.weight.flatten(), self.layer.weight.grad.flatten()
        k = round(fraction * int(mask.sum()))
        if k == 0:
            return
        drop = torch.where(mask > 0, weight.abs(), torch.full_like(weight, float("inf"))).topk(k, largest=False).indices
        grow = torch.where(mask > 0, torch.full_like(grad, -1.0), grad.abs()).topk(k).indices
        mask[drop] = 0
        mask[grow] = 1
        weight[grow] = 0


def _masked_model(model: nn.Module, targets: list[str], densities: dict[str, float], seed: int) -> nn.Module:
    masked = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name in targets:
        parent, _, child = name.rpartition(".")
        holder = masked.get_submodule(parent) if parent else masked
        setattr(holder, child, MaskedLinearOrConv(masked.get_submodule(name), densities[name], generator))
    return masked


def run_dynamic(name: str, model: nn.Module, targets: list[str], x: torch.Tensor, y: torch.Tensor, loss_fn, *,
                sparsity: float = 0.9, rounds: int = 3, repeats: int = 5, warmup: int = 2, seed: int = 0) -> dict:
    """One row: the four variants of ``model`` (its ``targets`` layers sparse or masked) side by side."""
    torch.manual_seed(seed)
    dense = model
    sparse = make_sparse(copy.deepcopy(dense), sparsity, "uniform", layers=targets, seed=seed)
    densities = {target: sparse.get_submodule(target).nnz / sparse.get_submodule(target).n_weights
                 for target in targets}
    masked = _masked_model(dense, targets, densities, seed)
    rigl_model = copy.deepcopy(sparse)
    models = {"dense": dense, "sparse": sparse, "rigl": rigl_model, "masked_rigl": masked}
    optimizers = {key: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for key, m in models.items()}
    end_step = 10 ** 9  # the drop fraction stays at its start: every timed update moves a full share
    rigl = RigL(rigl_model, optimizers["rigl"], update_every=UPDATE_EVERY, drop_fraction=DROP_FRACTION,
                end_step=end_step, seed=seed)
    # rigl's steps between updates run with its hooks in place (idle), timed beside the others
    calls = {key: optimizer_step_call(m, optimizers[key], x, y, loss_fn) for key, m in models.items()}
    masked_layers = [module for module in masked.modules() if isinstance(module, MaskedLinearOrConv)]

    def capture_step():  # the step before an update: RigL keeps each layer's input and output gradient
        rigl._capturing = True
        calls["rigl"]()

    def rigl_update():
        rigl.step_count = UPDATE_EVERY - 1
        rigl.step()

    def masked_update():
        for layer in masked_layers:
            layer.update(DROP_FRACTION)

    for call in calls.values():
        call()
    capture_step()
    rigl_update()
    calls["rigl"]()  # a step after the move: its gradients and Adam state exist again
    held = {key: stored_bytes(m, optimizers[key]).training_bytes for key, m in models.items()}
    rounds_ms = {key: [] for key in ("sparse", "rigl", "masked_rigl")}
    update_ms = []
    for _ in range(rounds):
        times = time_interleaved(calls, repeats, warmup)
        capture_ms = time_block(capture_step, repeats, 0)
        update_ms.append(time_block(lambda: (capture_step(), rigl_update()), repeats, 0) - capture_ms)
        masked_update_ms = time_block(masked_update, repeats, 0)
        amortised = ((UPDATE_EVERY - 1) * times["rigl"] + capture_ms + update_ms[-1]) / UPDATE_EVERY
        masked_amortised = times["masked_rigl"] + masked_update_ms / UPDATE_EVERY
        rounds_ms["sparse"].append((times["sparse"], times["dense"]))
        rounds_ms["rigl"].append((amortised, times["dense"]))
        rounds_ms["masked_rigl"].append((masked_amortised, times["dense"]))
    record = {"model": name, "sparsity": sparsity, "batch": x.shape[0], "threads": torch.get_num_threads(),
              "update_every": UPDATE_EVERY, "update_peak_bytes": rigl.peak_update_bytes,
              "rigl_update_ms": statistics.median(update_ms)}
    record.update({f"{key}_train_bytes": value for key, value in held.items()})
    return summarise_rounds(rounds_ms, record)


def layer_row(rounds: int = 3, out_features: int = 4096, in_features: int = 4096, batch: int = 64) -> dict:
    """The 4096x4096 layer, as inside a network (its input needs a gradient)."""
    layer = nn.Sequential(nn.Linear(in_features, out_features))
    x = torch.randn(batch, in_features, requires_grad=True)
    return run_dynamic(f"Linear {out_features}x{in_features}", layer, ["0"], x, None,
                       lambda out, _: out.square().mean(), rounds=rounds)


def model_row(rounds: int = 3, batch: int = 64) -> dict:
    """The whole VGG11_bn (CIFAR head), every convolution but the first and every linear layer sparse."""
    from actuallysparse.bench_conv import vgg11_bn_cifar

    torch.manual_seed(0)
    model = vgg11_bn_cifar()
    first = next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear)) and name != first]
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return run_dynamic("VGG11_bn (CIFAR head)", model, targets, x, y, F.cross_entropy, rounds=rounds, repeats=3)


def run(rounds: int = 3, quick: bool = False, progress: bool = True) -> list[dict]:
    """The benchmark's rows (``quick``: a small layer only, one round)."""
    if quick:
        return [layer_row(rounds=1, out_features=256, in_features=512, batch=16)]
    rows = []
    for make in tqdm((layer_row, model_row), desc="dynamic", disable=not progress, file=sys.stderr):
        rows.append(make(rounds=rounds))
    return rows


def format_table(records: list[dict]) -> str:
    """One markdown row per model: speedups (dense ms ÷ variant ms) and MiB held training with Adam."""
    lines = ["| model | sparsity | B | ΔT | sparse step | RigL step (amortised) | RigL ÷ sparse step | masked RigL | "
             "RigL ÷ masked RigL | MiB dense / sparse / RigL / masked RigL | masked ÷ RigL bytes | "
             "RigL update ms | RigL update peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        held = [r[f"{key}_train_bytes"] / MIB for key in VARIANTS]
        lines.append(
            f"| {r['model']} | {r['sparsity']:g} | {r['batch']} | {r['update_every']} | {ratio_cell(r, 'sparse')} | "
            f"{ratio_cell(r, 'rigl')} | {r['rigl_ms'] / r['sparse_ms']:.3f} | {ratio_cell(r, 'masked_rigl')} | "
            f"{r['masked_rigl_ms'] / r['rigl_ms']:.2f} | {' / '.join(f'{v:.1f}' for v in held)} | "
            f"{r['masked_rigl_train_bytes'] / r['rigl_train_bytes']:.2f} | {r['rigl_update_ms']:.0f} | "
            f"{r['update_peak_bytes'] / MIB:.1f} |")
    return "\n".join(lines)


def check_targets(records: list[dict]) -> list[str]:
    """The issue's targets, each with its measured value and met or missed."""
    lines = []
    for r in records:
        checks = [("RigL step ≤ 1.15x the fixed-pattern step", r["rigl_ms"] / r["sparse_ms"], 1.15, False),
                  ("RigL ≥ 3x faster than masked RigL per step", r["masked_rigl_ms"] / r["rigl_ms"], 3.0, True),
                  ("RigL holds ≥ 4x fewer bytes than masked RigL (Adam)",
                   r["masked_rigl_train_bytes"] / r["rigl_train_bytes"], 4.0, True)]
        for text, value, bound, at_least in checks:
            met = value >= bound if at_least else value <= bound
            lines.append(f"- {r['model']}: {text}: {value:.2f} ({'met' if met else 'missed'})")
    return lines
