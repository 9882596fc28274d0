"""The functional torch cell as a ``torch.nn.Module`` (what ``torch.export`` and the ONNX
exporter take): its parameters held by the module, lengths an input."""

from __future__ import annotations

import torch


class CellModel(torch.nn.Module):
    """``CellModel(cell, params)(x, h0, c0, lengths=None) -> y, h_n, c_n``."""

    def __init__(self, cell, params):
        super().__init__()
        self.cell = cell
        self.values = torch.nn.ParameterList(
            [torch.nn.Parameter(v) for layer in params for p in layer for v in p.values()]
        )
        self.layout = [[list(p) for p in layer] for layer in params]

    def params(self):
        it = iter(self.values)
        return [[{k: next(it) for k in keys} for keys in layer] for layer in self.layout]

    def forward(self, x, h0, c0, lengths=None):
        y, (h, c) = self.cell(self.params(), x, (h0, c0), lengths)
        return y, h, c
