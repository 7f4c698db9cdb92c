"""Part 8c: GPTQ - INT4 codes chosen to keep a layer's *outputs* right, not just its weights.

Round-to-nearest (Part 8a) makes every weight as close as it can be on its own. But what
the model needs is the layer's output ``y = x W^T`` on the inputs it really sees, and
inputs are correlated: the rounding error of one column can be partly cancelled by
nudging the columns that are not quantized yet. GPTQ (Frantar et al., 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", after
Optimal Brain Quantization) does this one column at a time, for all rows at once.

With calibration inputs ``X`` (``[n, K]``, rows are tokens), the squared output error of a
row ``w`` is ``(w - w_hat) H (w - w_hat)^T / 2`` with the Hessian ``H = 2 X^T X / n``. When
column ``i`` is rounded (error ``e_i = w_i - q_i s``), the best update of the columns
``j > i`` still free is ``w_j -= e_i * Hinv[i, j] / Hinv[i, i]`` (OBS, Hassibi & Stork
1993). GPTQ's three tricks (paper section 4): the same column order for every row, so
``Hinv`` is shared; the rows of the *upper Cholesky factor* ``U`` of ``H^-1`` hold exactly
the coefficients ``Hinv[i, j] / Hinv[i, i]`` scaled by ``U[i, i]`` that each step needs
(``err = e_i / U[i, i]``, ``w_j -= err * U[i, j]``), so ``H^-1`` is never updated; and lazy
batches: inside a block of columns updates are applied at once, to the columns after the
block with one matrix product per block.

Damping: ``H += damp * mean(diag H) * I`` (the paper uses 1%) keeps the Cholesky
factorization stable. Dead inputs: a column that is 0 for every calibration token has
``H[j, j] = 0``; its weights cannot matter on these inputs, so it is set to 0 and
``H[j, j] = 1``.

Groups: the output is Part 8a's INT4 format (symmetric, codes in ``[-7, 7]``, one float32
scale per row and group of ``group_size`` columns, packed two per byte), so the engine
and Part 8b's kernel run it unchanged. A group's scales come from Part 8a's
``quantize_int4`` applied to the group's weights *as they are when GPTQ reaches the
group's first column* (earlier columns' errors already folded in), which also gives
all-zero groups their guarded scale of 1.0. With an identity Hessian nothing is
correlated and GPTQ gives exactly Part 8a's codes.
"""

from __future__ import annotations

import torch

from .quantization import INT4_QMAX, check_group_size, pack_int4, quantize_int4

DEFAULT_DAMP = 0.01
BLOCK_SIZE = 128  # lazy-batch width (a multiple of every group size, so a group never straddles blocks)


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / n`` in float32 for the layer inputs ``X`` (``[..., K]``, flattened to ``[n, K]``).

    Raises:
        ValueError: naming ``inputs`` if it is not floating point with at least one row.
    """
    ### BEGIN SOLUTION
    if not inputs.is_floating_point() or inputs.dim() < 2 or inputs.numel() == 0:
        raise ValueError(f"inputs must be a floating-point [..., K] tensor with at least one row, got {tuple(inputs.shape)}")
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    return 2.0 * (x.T @ x) / x.shape[0]
    ### END SOLUTION


def gptq_quantize_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 64, damp: float = DEFAULT_DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of a ``[N, K]`` weight into Part 8a's INT4 format.

    Args:
        weight: ``[N, K]`` floating point (left unchanged).
        hessian: ``[K, K]`` from :func:`hessian_from_inputs` over the layer's calibration inputs.
        group_size: 32, 64 or 128, dividing ``K``.
        damp: relative damping added to the diagonal (``damp * mean(diag(H))``).

    Returns:
        ``(packed, scales)`` as :func:`~.quantization.quantize_int4` returns them: uint8
        ``[N, K // 2]`` and float32 ``[N, K // group_size]``, all finite.

    Raises:
        ValueError: naming ``weight``, ``hessian`` or ``group_size`` when they do not fit.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point [N, K] tensor, got {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] (K x K of the weight's input width), got {tuple(hessian.shape)}")
    check_group_size(group_size, k)
    # Hints: W = weight.float().clone(); H = hessian.float().clone(); the dead-input and
    # damping fixes; U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).
    # For each block [b0, b1) of BLOCK_SIZE columns: for each column c in it, at the
    # start of a group take its scales with quantize_int4(Wb[:, i:i + group_size], group_size);
    # q = round(w / s) clamped to [-7, 7]; err = (w - q s) / U[c, c];
    # Wb[:, i:] -= err[:, None] * U[c, c:b1]; keep err; after the block,
    # W[:, b1:] -= Err @ U[b0:b1, b1:]. Pack the codes at the end.
    ### BEGIN SOLUTION
    w_all = weight.detach().float().clone()
    n = w_all.shape[0]
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w_all[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.int8, device=w_all.device)
    scales = torch.zeros(n, k // group_size, dtype=torch.float32, device=w_all.device)
    for b0 in range(0, k, BLOCK_SIZE):
        b1 = min(b0 + BLOCK_SIZE, k)
        wb = w_all[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # the group's scale, from its weights as updated so far
                scales[:, col // group_size] = quantize_int4(wb[:, i : i + group_size], group_size)[1][:, 0]
            s = scales[:, col // group_size]
            q = torch.round(wb[:, i] / s).clamp(-INT4_QMAX, INT4_QMAX)
            codes[:, col] = q.to(torch.int8)
            err = (wb[:, i] - q * s) / u[col, col]
            wb[:, i:] -= err[:, None] * u[col, col:b1][None, :]
            errs[:, i] = err
        w_all[:, b1:] -= errs @ u[b0:b1, b1:]
    return pack_int4(codes), scales
    ### END SOLUTION


def output_error(inputs: torch.Tensor, weight: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs: ``mean((X W^T - X W_hat^T)^2)`` over ``X = inputs``."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return float(((x @ (weight.double() - w_hat.double()).T) ** 2).mean())
