"""DP-SGD for a lone client through Opacus (the deployed client's default).

A deployed client trains alone (one slot), so it can use Opacus' own DP-SGD
machinery on its model instead of fedlora's batched one (``fedlora.privacy.dpsgd``):

* :class:`opacus.GradSampleModule` computes the per-example gradients, through grad
  samplers registered here for fedlora's layers (:class:`~fedlora.lora.BatchedLoRALinear`,
  :class:`~fedlora.lora.BatchedLinear`); they call the same kernels as the batched path
  (``kernels.per_sample``), which are tested equal to Opacus' own on a PEFT model;
* :class:`opacus.optimizers.DPOptimizer` clips each example to ``C``
  (``--max-grad-norm``), sums, adds ``N(0, σ² C²)`` and divides by the expected batch
  ``q·n``, then steps AdamW;
* the client's :class:`~fedlora.privacy.Budget` (Opacus' RDP accountant at the same
  ``q`` and ``σ``) is the ledger that stops training and survives restarts.

With ``--lora-dropout`` the rows carry the simulator's dropout keys, and the grad sampler reads the
adapter's dropped-out input (:meth:`~fedlora.models.lora.BatchedLoRALinear.dropped`, from the keys
the forward left on the router), not the layer input Opacus kept.

Two parts are fedlora's, for reasons a deployment cares about:

* **Batches**: ``PrivacyEngine.make_private`` would fix the sampling rate to
  ``1/⌈n/B⌉`` and draw batches from a torch generator; here they are the same secret
  Poisson draws at ``q = B/n`` as the simulator's (:func:`fedlora.privacy.dpsgd.poisson_batches`).
* **Noise**: Opacus draws it from a torch generator, whose CPU seed is 32 bits (or the
  global one, which fedlora seeds from ``--seed``); :class:`SecretNoiseDPOptimizer` draws
  it from :class:`~fedlora.privacy.GaussianNoise` (128 secret bits, or keyed to the seed
  with ``--dp-reproducible``, the key the simulator uses, so both give the same adapter).

Opacus' ``strict`` check is off because it refuses any trainable layer with buffers;
fedlora's buffers are LoRA scales, rank masks and the server's frozen LoRA-SB factors,
none of them data dependent. Layers that do mix examples (batch norm) are refused
earlier (:func:`fedlora.privacy.accounting.is_per_sample_safe`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedlora.errors import UserError
from fedlora.kernels import subrow_keys
from fedlora.models.head import BatchedLinear
from fedlora.models.lora import BatchedLoRALinear
from fedlora.privacy.accounting import Budget, GaussianNoise
from fedlora.privacy.dpsgd import (
    dp_parameters,
    layer_grad_samples,
    noise_generator,
    poisson_batches,
)
from fedlora.tasks import gather_rows
from fedlora.training.optim import make_optimizer


@register_grad_sampler([BatchedLoRALinear, BatchedLinear])
def _fedlora_grad_sampler(layer: nn.Module, activations: list[Tensor],
                          backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Opacus grad sampler: ``{parameter: (N, *parameter.shape)}`` for a one-slot layer."""
    x = activations[0]
    n = x.shape[0]
    if layer.router.batch_rows(x) != n:  # Opacus would take each token of (N·T, d) for an example
        raise UserError("--dp-backend opacus cannot clip per example over a layer whose input the model"
                        " flattens to tokens (OPT's MLP); use --dp-backend fedlora, or leave the layer out"
                        " of --target-modules")
    if next(p for p in layer.parameters() if p.requires_grad).shape[0] != 1:
        raise ValueError("Opacus' per-example gradients need a one-slot model (one client per pass)")
    ids = torch.zeros(n, dtype=torch.long, device=x.device)
    if isinstance(layer, BatchedLoRALinear):
        x = layer.dropped(layer.router.as_rows(x))
    return {p: gs.unsqueeze(1).to(p.dtype) for p, gs in layer_grad_samples(layer, x, backprops, ids)}


class SecretNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with the Gaussian noise drawn by :class:`GaussianNoise`.

    ``noise(k)`` returns the generator of the k-th noised step (0, 1, …). Clipping,
    summing and the division by the expected batch are Opacus'.
    """

    def __init__(self, *args, noise: Callable[[int], GaussianNoise], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise = noise
        self.noised_steps = 0

    def add_noise(self) -> None:
        sigma = self.noise_multiplier
        self.noise_multiplier = 0.0            # Opacus' part: p.grad = the clipped sum
        try:
            super().add_noise()
        finally:
            self.noise_multiplier = sigma
        gen = self.noise(self.noised_steps)
        self.noised_steps += 1
        for p in self.params:
            xi = gen.normal(p.shape).to(p.grad.device, p.grad.dtype)
            p.grad.add_(sigma * self.max_grad_norm * xi)


def opacus_train_client(fm, data: dict[str, Tensor], sampler, cfg, budget: Budget, rnd: int,
                        progress=None) -> float:
    """Round ``rnd`` of DP-SGD for slot 0 of a one-slot model; the mean batch loss.

    Steps stop when ``budget`` cannot afford another; every step taken is counted in it.
    """
    if fm.num_clients != 1:
        raise ValueError(f"the Opacus DP path trains one client; the model has {fm.num_clients} slots")
    sampler.start_round(rnd)
    device = next(fm.parameters()).device
    q = min(1.0, cfg.batch_size / len(sampler))
    gsm = GradSampleModule(fm, batch_first=True, loss_reduction="mean", strict=False)
    opt = SecretNoiseDPOptimizer(
        make_optimizer(dp_parameters(fm), cfg),
        noise_multiplier=budget.sigma, max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=q * len(sampler), loss_reduction="mean",
        noise=lambda step: noise_generator(sampler.seed, rnd, step, cfg.dp_reproducible))
    total = count = 0.0
    layers = fm.client_layers()
    fm.train()  # the flag only: the rows' dropout keys count
    for layer in layers:  # Opacus hooks only layers in training mode; their frozen base stays in eval
        layer.training = True  # (not .train(): an int8 base computes otherwise in training mode on CPU)
    try:
        for step in range(cfg.local_steps):
            if not budget.can_step():
                break
            opt.zero_grad(set_to_none=True)
            packed = poisson_batches([sampler], [q], cfg.dp_reproducible, step)
            idx = packed.indices
            # an empty Poisson draw is one zero-weight row: the step releases noise only
            w = torch.ones(len(idx), device=device) if idx else torch.zeros(1, device=device)
            keys = subrow_keys(packed.keys if idx else torch.zeros(1, dtype=torch.long),
                               cfg.task.rows_per_example)
            batch = gather_rows(data, idx or [int(sampler.indices[0])], device, cfg.pad_to_longest)
            labels = batch.pop("labels")
            positions = cfg.task.logit_positions(labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = gsm(positions=positions, dropout_keys=keys, **batch)
            losses = cfg.task.row_losses(out.logits, labels, positions)
            with warnings.catch_warnings():   # the frozen base: the first adapter's input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (losses * w).mean().backward()  # Opacus rescales by the rows: w_i ∇ℓ_i each
            opt.step()
            budget.step()
            total += float((losses.detach() * w).sum())
            count += float(w.sum())
            if progress is not None:
                progress()
    finally:
        opt.zero_grad(set_to_none=True)
        gsm.cleanup()
        fm.eval()
        for layer in layers:
            layer.training = False
    return total / max(count, 1.0)
