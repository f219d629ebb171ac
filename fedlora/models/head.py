"""Task heads that hold K clients at once: a classifier's (or regressor's) linear head per client.

For row i of client k, ``y_i = x_i W_kᵀ + b_k`` with ``W`` stored ``(K, d_out, d_in)``: one batched
matmul over the rows routed by the model's shared :class:`~fedlora.models.lora.Router`, never a
loop over clients. Heads train in full (no low-rank factors) and travel whole.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlora.kernels import dense_delta
from fedlora.models.lora import Router, adapter_dtype


class BatchedLinear(nn.Module):
    """K per-client copies of a trainable linear layer (a task head).

    ``y_i = x_i W_kᵀ + b_k`` for row i of client k; weights ``(K, d_out, d_in)``,
    all slots initialised from the given layer. A layer without a bias (a decoder's ``score``
    head) stays without one: ``bias`` is None, and only ``weight`` trains and travels.
    """

    def __init__(self, base: nn.Linear, num_clients: int, router: Router) -> None:
        super().__init__()
        self.router = router
        w = base.weight.detach().to(adapter_dtype(base.weight.dtype))
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(num_clients, 1, 1).clone())
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            b = base.bias.detach().to(w.dtype)
            self.bias = nn.Parameter(b.unsqueeze(0).repeat(num_clients, 1).clone())

    @property
    def slot_keys(self) -> tuple[str, ...]:
        """The names of the tensors a slot holds: ``weight``, and ``bias`` when the layer has one."""
        return ("weight",) if self.bias is None else ("weight", "bias")

    def forward(self, x: Tensor) -> Tensor:
        xr = self.router.as_rows(x)                               # (N, ..., d_in)
        y = dense_delta(xr.to(self.weight.dtype), self.weight, self.router.get(xr), self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def get_slot(self, k: int) -> dict[str, Tensor]:
        return {key: getattr(self, key)[k].detach().clone() for key in self.slot_keys}

    @torch.no_grad()
    def set_slot(self, k: int, state: dict[str, Tensor]) -> None:
        for key in self.slot_keys:
            if tuple(state[key].shape) != tuple(getattr(self, key).shape[1:]):
                raise ValueError(f"head {key} expects shape {tuple(getattr(self, key).shape[1:])},"
                                 f" got {tuple(state[key].shape)}")
        for key in self.slot_keys:
            getattr(self, key)[k] = state[key].to(self.weight)
