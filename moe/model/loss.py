"""Cross-entropy of the output projection, chunked over positions: no (T, V) logits in memory.

With a 49k-token vocabulary the logits of a batch are the largest tensor of a training step
(T x V fp32, twice more for softmax and its gradient). `linear_cross_entropy(h, W, targets)`
computes the same loss as `F.cross_entropy(F.linear(h, W).float(), targets)` a chunk of
positions at a time: each chunk's logits live only inside the loop. When a gradient is needed,
each chunk's gradients with respect to `h` and `W` are computed right there (the loss is the
last operation, so the only thing the backward adds is the incoming scalar), which costs the
same three matmuls as the plain loss and keeps nothing of the logits for the backward.

Shape legend: the one stated in moe_kernels/__init__.py, shared by the kernels and moe.model.
Here: T positions (tokens, B*L), D model dim, V vocabulary, Tc positions per chunk, Vb rows of
a vocabulary block.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # positions per chunk: Tc x V fp32 logits (196 MiB at V=49152, Tc=1024)
VOCAB_BLOCK = 8192  # rows of the head's gradient computed at once in a low dtype (bf16-mixed)


def bits_per_byte(nats: float, nbytes: int) -> float:
    """Bits per UTF-8 byte: total negative log-likelihood (nats) over the bytes its targets cover.

    The one place the conversion is made (training's validation, `moe eval`, the ensemble and
    every experiment's held-out scores), so models with different tokenizers compare."""
    return nats / max(nbytes, 1) / math.log(2)


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's when it is on (bf16-mixed), else h's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """(h_TD, w_VD, targets_T) -> (summed loss, per-position losses T, not differentiable)."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, chunk: int, dtype: torch.dtype, need_grad: bool):
        T = h_TD.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmax in fp32 (fp64 in tests)
        losses_T = torch.zeros(T, dtype=acc, device=h_TD.device)
        w = w_VD.to(dtype)
        grad_h = torch.empty_like(h_TD) if need_grad and ctx.needs_input_grad[0] else None
        want_w = need_grad and ctx.needs_input_grad[1]
        grad_w = None  # (V, D) in acc, allocated by the first chunk's product (no zero fill)
        with torch.autocast(h_TD.device.type, enabled=False):
            for s in range(0, T, chunk):
                h = h_TD[s : s + chunk].to(dtype)  # (Tc, D)
                tgt = targets_T[s : s + chunk]  # (Tc,)
                valid = tgt != IGNORE_INDEX
                safe = torch.where(valid, tgt, 0)
                logits = (h @ w.t()).to(acc)  # (Tc, V)
                lse = torch.logsumexp(logits, dim=-1)  # (Tc,)
                picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
                losses_T[s : s + chunk] = torch.where(valid, lse - picked, 0.0)
                if grad_h is None and not want_w:
                    continue
                # d(sum of losses)/d logits = softmax - one_hot, zero on ignored rows
                dlogits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: (Tc, V)
                dlogits[torch.arange(len(tgt), device=tgt.device), safe] -= 1.0
                dlogits.mul_(valid.unsqueeze(1))
                d = dlogits.to(dtype)
                if dtype != acc:
                    del logits, dlogits  # (Tc, V) in acc: d holds what is left to use
                if grad_h is not None:
                    grad_h[s : s + chunk] = (d @ w).to(grad_h.dtype)  # (Tc, D)
                if s + chunk >= T and w is not w_VD:
                    del w  # the last chunk is done with the cast copy: free it before grad_w
                if want_w:
                    first = grad_w is None
                    if dtype == acc:
                        gw = d.t() @ h  # (V, D)
                        grad_w = gw if first else grad_w.add_(gw)
                    else:
                        # a (V, D) product in the low dtype would sit beside the acc gradient:
                        # write it a block of vocabulary rows at a time instead
                        if first:
                            grad_w = torch.empty(w_VD.shape, dtype=acc, device=w_VD.device)
                        for v in range(0, w_VD.shape[0], VOCAB_BLOCK):
                            gw = d[:, v : v + VOCAB_BLOCK].t() @ h  # (Vb, D)
                            if first:
                                grad_w[v : v + VOCAB_BLOCK] = gw
                            else:
                                grad_w[v : v + VOCAB_BLOCK] += gw
        if want_w and grad_w is None:  # no positions at all
            grad_w = torch.zeros(w_VD.shape, dtype=acc, device=w_VD.device)
        ctx.mark_non_differentiable(losses_T)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (grad_h is not None, want_w)
        ctx.w_dtype = w_VD.dtype
        return losses_T.sum(), losses_T

    @staticmethod
    def backward(ctx, g_loss, _g_losses):
        if not any(ctx.has):
            raise RuntimeError(
                "linear_cross_entropy was called with need_grad=False; its loss has no gradient"
            )
        grad_h, grad_w = ctx.saved_tensors
        # the saved gradients are used once: scale them in place (no second (V, D) buffer)
        gh = grad_h.mul_(g_loss.to(grad_h.dtype)) if ctx.has[0] else None
        gw = grad_w.mul_(g_loss).to(ctx.w_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats) of `F.linear(h, weight)` against `targets` and the
    per-position losses (shape of `targets`, 0 where IGNORE_INDEX, no gradient).

    h (..., D), weight (V, D), targets (...). Only the summed loss carries a gradient; divide it
    by the number of targets for the mean.
    """
    h_TD = h.reshape(-1, h.shape[-1])
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    total, losses_T = _LinearCrossEntropy.apply(
        h_TD, weight, targets.reshape(-1), chunk, _compute_dtype(h, weight), need_grad
    )
    return total, losses_T.view(targets.shape)
