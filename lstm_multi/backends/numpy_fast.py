"""In-place operations for the NumPy-like eager loop.

The reference ``ArrayModuleOps`` makes a new array for every product; here the
input projection is one contiguous (T*B, in) GEMM and each step accumulates
r U into its slice of it. The gate math stays ``lstm_multi.spec``'s. Written
against ``xp`` only.
"""

from __future__ import annotations

from ..ops import ArrayModuleOps


class InPlaceOps(ArrayModuleOps):
    """ArrayModuleOps whose products accumulate into the projection buffer."""

    def project(self, xs, W, b):
        t, n, size = xs.shape
        z = self.xp.ascontiguousarray(xs).reshape(t * n, size) @ W
        z += b  # a fresh array: the steps accumulate into it
        return z.reshape(t, n, W.shape[1])

    def add_matmul(self, z, a, b):
        """z + a b, accumulated into z in place (a cast to b's dtype first)."""
        z += self.cast(a, self.dtype_name(b)) @ b
        return z
