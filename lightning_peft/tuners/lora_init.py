"""Principal initialisations of LoRA (PiSSA, OLoRA): A and B from the base weight, which keeps the rest.

Both split the frozen weight ``W [out, in]`` into a rank-r part that the adapter starts from and a
residual that stays in the base: ``W = (W - s·B A) + s·B A`` (s the LoRA scaling), so the adapted
model starts exactly where the base model was, but training moves the principal directions.
The math is peft's, so the same base weights give the same adapter:

* ``"pissa"``: the top-r singular triplets, ``A = sqrt(S_r / s) Vhᵀ_r``, ``B = U_r sqrt(S_r / s)``;
* ``"pissa_niter_<k>"``: the same from ``torch.svd_lowrank`` with k subspace iterations (fast,
  randomized: it draws from the global RNG);
* ``"olora"``: ``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]``.

Because the base weight changes, such an adapter only fits a base that went through the same
initialisation; :func:`to_plain_lora` turns a trained one into an ordinary LoRA (rank 2r) of the
original weights, peft's ``path_initial_model_for_weight_conversion`` conversion.
"""

from __future__ import annotations

import re

import torch

__all__ = ["is_principal_init", "principal_factors", "to_plain_lora"]

_NITER = re.compile(r"pissa_niter_(\d+)")


def is_principal_init(init: object) -> bool:
    """Whether ``init_lora_weights`` asks for PiSSA / OLoRA (which change the base weight)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or _NITER.fullmatch(init) is not None)


@torch.no_grad()
def principal_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` for the base ``weight [out, in]``, in float32 (float64 for a float64 weight)."""
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


def to_plain_lora(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained principal-init adapter ``(A, B)`` with initial ``(A0, B0)`` as a LoRA of the *original* weight.

    ``W_res + s·B A = W + s·(B A - B0 A0) = W + s·[B, -B0] [A; A0]``: rank ``2r``, same scaling when
    ``lora_alpha`` doubles with ``r`` (``sqrt(2)`` times with rsLoRA).
    """
    return torch.cat((a, a0), dim=0), torch.cat((b, -b0), dim=1)
