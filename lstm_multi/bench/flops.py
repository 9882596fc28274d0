"""FLOP counts of one LSTM layer and the machine's limit (FLOPs over the measured GEMM rate)."""

from __future__ import annotations


def gemm_flops(size, mode):
    """FLOPs of the matrix products of one layer, one direction.

    Forward: the input projection 2 T B I 4H plus the recurrent products
    2 T B H 4H. The backward doubles both (the gradient of the input and of the
    weights for each product), so forward + backward is three times forward.
    The gate math (O(T B H)) is not counted.
    """
    t, b, i, h = size.steps, size.batch, size.input_size, size.hidden_size
    forward = 2 * t * b * (i + h) * 4 * h
    return 3 * forward if mode == "forward_backward" else forward  # "step": forward


def limit_seconds(size, mode, gemm_rate):
    """The shortest time the case could take: its GEMM FLOPs at the machine's GEMM rate."""
    if not gemm_rate:
        return None
    return gemm_flops(size, mode) / gemm_rate
