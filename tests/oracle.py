"""The independent oracle: an LSTM written from the documented equations, in float64.

It imports nothing from ``lstm_multi``: every agreement test compares the library
with what the docs say (``docs/model.md``: the equation tables and the canonical
parameters), not with another part of the library. It is written to be read
against that page, not to be fast:

- one sequence at a time, over its valid steps only (steps past ``lengths[n]``,
  or where a per-step ``mask`` is False, are never read, so padding cannot reach
  it): a masked step is skipped, which is the README's "held" (the state carries
  over it unchanged) with a zero output there;
- one gate at a time, each with its own slice of W, U and b;
- gradients by PyTorch autograd of that plain computation.

The documented contract it implements (gate order i, f, g, o; W (in, 4H),
U (H, 4H), b (4H,), p (3, H) with rows (i, f, o); states (L * D, B, H);
direction 1 reads each sequence reversed within its length; outputs past the
length are zero; h_n, c_n are the states at the last valid step)::

    "lstm"           r = h_{t-1}; i=σ(z_i) f=σ(z_f) g=tanh(z_g) o=σ(z_o)
                     c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
    "peephole"       r = h_{t-1}; i=σ(z_i + p_i c_{t-1}) f=σ(z_f + p_f c_{t-1}) g=tanh(z_g)
                     c_t = f c_{t-1} + i g;  o=σ(z_o + p_o c_t);  h_t = o tanh(c_t)
    "peephole_full"  r = c_{t-1}; i=σ(z_i) f=σ(z_f) o=σ(z_o) g=σ(x_t W_g + b_g)
                     c_t = f c_{t-1} + i g;  h_t = tanh(o c_t)

and Greff et al.'s variants, each "peephole" with one change (r = h_{t-1}; p has
one row per gate that reads the cell, in gate order)::

    "nig"   i = 1                    p rows (f, o)
    "nfg"   f = 1                    p rows (i, o)
    "nog"   o = 1                    p rows (i, f)
    "niaf"  g = z_g                  p rows (i, f, o)
    "noaf"  h_t = o c_t              p rows (i, f, o)
    "cifg"  f = 1 - i                p rows (i, o)

with z = x_t W + r U + b split into four blocks of width H.

The layer-normalised LSTM of Ba, Kiros & Hinton (2016), r = h_{t-1}, each LN over
the whole row of its argument (eps = 1e-5, the biased variance)::

    "layernorm"           z   = LN(x_t W; γ_x, β_x) + LN(h_{t-1} U; γ_h, β_h) + b   (4H)
                          c_t = σ(z_f) c_{t-1} + σ(z_i) tanh(z_g)
                          h_t = σ(z_o) tanh(LN(c_t; γ_c, β_c))                    (H)
    "layernorm_peephole"  the same z; i=σ(z_i + p_i c_{t-1}) f=σ(z_f + p_f c_{t-1})
                          c_t = f c_{t-1} + i tanh(z_g); o=σ(z_o + p_o c_t)
                          h_t = o tanh(LN(c_t; γ_c, β_c))

    LN(v; γ, β) = γ (v - mean(v)) / sqrt(var(v) + eps) + β

with γ_x, β_x, γ_h, β_h stored as (4, H), rows (i, f, g, o) (the (4H,) vectors
in gate order), γ_c, β_c as (1, H), and p (3, H) rows (i, f, o).

With a projection (proj_size P > 0, the LSTMP of Sak et al. 2014), the h each
row above produces is m_t, and h_t = m_t W_hr with W_hr (H, P): the
recurrence (r = h_{t-1}), the outputs, h_n and the next layer read the
projected h_t of width P; U is (P, 4H) where r = h_{t-1} (and (H, 4H) for
"peephole_full", whose r is c_{t-1}); c stays of width H.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError:  # the oracle's functions skip the test that calls them (require_torch)
    torch = None

GATES = ("i", "f", "g", "o")
VARIANTS = (
    "lstm",
    "peephole",
    "peephole_full",
    "nig",
    "nfg",
    "nog",
    "niaf",
    "noaf",
    "cifg",
    "layernorm",
    "layernorm_peephole",
)
#: the layer-normalised variants, their normalisations' parameters and their rows
LAYER_NORMS = ("layernorm", "layernorm_peephole")
LAYER_NORM_ROWS = {"gamma_x": 4, "beta_x": 4, "gamma_h": 4, "beta_h": 4, "gamma_c": 1, "beta_c": 1}
LN_EPS = 1e-5
#: the peephole rows (gates reading the cell) of each variant that has them
PEEPHOLE_ROWS = {
    "peephole": ("i", "f", "o"),
    "nig": ("f", "o"),
    "nfg": ("i", "o"),
    "nog": ("i", "f"),
    "niaf": ("i", "f", "o"),
    "noaf": ("i", "f", "o"),
    "cifg": ("i", "o"),
    "layernorm_peephole": ("i", "f", "o"),
}


def param_shapes(variant, input_size, hidden_size, num_layers, num_directions, proj_size=0):
    """The "Canonical parameters" table of ``docs/model.md``: shapes[layer][direction][key]."""
    h = hidden_size
    out = proj_size or h  # the width of h_t
    recurrent = h if variant == "peephole_full" else out
    shapes = []
    for layer in range(num_layers):
        size = input_size if layer == 0 else out * num_directions
        one = {"W": (size, 4 * h), "U": (recurrent, 4 * h), "b": (4 * h,)}
        if variant in PEEPHOLE_ROWS:
            one["p"] = (len(PEEPHOLE_ROWS[variant]), h)
        if variant in LAYER_NORMS:
            one.update({k: (rows, h) for k, rows in LAYER_NORM_ROWS.items()})
        if proj_size:
            one["W_hr"] = (h, proj_size)
        shapes.append([dict(one) for _ in range(num_directions)])
    return shapes


def require_torch():
    """PyTorch, which the oracle's autograd needs: without it the calling test is skipped
    with the reason (the constants and ``param_shapes`` above need no PyTorch)."""
    if torch is None:
        import pytest

        pytest.skip("the oracle computes its gradients by PyTorch autograd: pip install torch")
    return torch


def _block(matrix, gate, h):
    """The columns (or entries) of one gate: block k of width H for gate k of (i, f, g, o)."""
    k = GATES.index(gate)
    return matrix[..., k * h : (k + 1) * h]


def step(variant, x_t, h_prev, c_prev, W, U, b, p, drop=None, drop_x=None):
    """One time step of one sequence: x_t (in,), h_prev, c_prev (H,) -> (h_t, c_t).

    drop: recurrent dropout's masks (4, R), one per gate (Keras 3's): gate k's
    product reads recurrent * drop[k]; None: no recurrent dropout.
    drop_x: input dropout's masks (4, in), one per gate (Keras 3's implementation 1):
    gate k's input product reads x_t * drop_x[k]; None: no input dropout.
    """
    require_torch()
    h = c_prev.shape[-1]
    recurrent = c_prev if variant == "peephole_full" else h_prev

    def x_of(gate):
        return x_t if drop_x is None else x_t * drop_x[GATES.index(gate)]

    def z(gate):
        r = recurrent if drop is None else recurrent * drop[GATES.index(gate)]
        return x_of(gate) @ _block(W, gate, h) + r @ _block(U, gate, h) + _block(b, gate, h)

    if variant == "lstm":
        i, f = torch.sigmoid(z("i")), torch.sigmoid(z("f"))
        g, o = torch.tanh(z("g")), torch.sigmoid(z("o"))
        c = f * c_prev + i * g
        return o * torch.tanh(c), c
    if variant == "peephole":
        i = torch.sigmoid(z("i") + p[0] * c_prev)
        f = torch.sigmoid(z("f") + p[1] * c_prev)
        g = torch.tanh(z("g"))
        c = f * c_prev + i * g
        o = torch.sigmoid(z("o") + p[2] * c)
        return o * torch.tanh(c), c
    if variant == "peephole_full":
        i, f, o = torch.sigmoid(z("i")), torch.sigmoid(z("f")), torch.sigmoid(z("o"))
        g = torch.sigmoid(x_of("g") @ _block(W, "g", h) + _block(b, "g", h))  # no recurrent
        c = f * c_prev + i * g
        return torch.tanh(o * c), c
    if variant in PEEPHOLE_ROWS:
        return greff_step(variant, z, c_prev, p)
    raise ValueError(f"oracle: unknown variant {variant!r}")


def layer_norm(v, gamma, beta, eps=LN_EPS):
    """LN(v; γ, β) over the whole vector v (its last axis), with the biased variance."""
    centred = v - v.mean(-1, keepdim=True)
    variance = (centred * centred).mean(-1, keepdim=True)
    return gamma * centred / torch.sqrt(variance + eps) + beta


def layer_norm_step(variant, x_t, h_prev, c_prev, p, drop=None, drop_x=None):
    """One step of "layernorm" / "layernorm_peephole" (table above) from the parameters p;
    drop, drop_x: recurrent and input dropout's masks (4, R), (4, in) as in ``step``
    (gate k's block of h_{t-1} U reads h_{t-1} * drop[k], of x_t W x_t * drop_x[k]), or
    None."""
    h = c_prev.shape[-1]

    def product(v, weight, masks):
        if masks is None:
            return v @ weight
        return torch.cat([(v * masks[k]) @ weight[:, k * h : (k + 1) * h] for k in range(4)], -1)

    recurrent = product(h_prev, p["U"], drop)
    z = (
        layer_norm(product(x_t, p["W"], drop_x), p["gamma_x"].reshape(-1), p["beta_x"].reshape(-1))
        + layer_norm(recurrent, p["gamma_h"].reshape(-1), p["beta_h"].reshape(-1))
        + p["b"]
    )
    zi, zf, zg, zo = (_block(z, gate, h) for gate in GATES)
    if variant == "layernorm":
        c = torch.sigmoid(zf) * c_prev + torch.sigmoid(zi) * torch.tanh(zg)
        o = torch.sigmoid(zo)
    else:
        peep = p["p"]
        i = torch.sigmoid(zi + peep[0] * c_prev)
        f = torch.sigmoid(zf + peep[1] * c_prev)
        c = f * c_prev + i * torch.tanh(zg)
        o = torch.sigmoid(zo + peep[2] * c)
    return o * torch.tanh(layer_norm(c, p["gamma_c"][0], p["beta_c"][0])), c


def greff_step(variant, z, c_prev, p):
    """The Greff et al. variants: "peephole" with its one change (see the table)."""
    peep = dict(zip(PEEPHOLE_ROWS[variant], p, strict=True))
    one = torch.ones_like(c_prev)
    i = one if variant == "nig" else torch.sigmoid(z("i") + peep["i"] * c_prev)
    if variant == "nfg":
        f = one
    elif variant == "cifg":
        f = 1 - i
    else:
        f = torch.sigmoid(z("f") + peep["f"] * c_prev)
    g = z("g") if variant == "niaf" else torch.tanh(z("g"))
    c = f * c_prev + i * g
    o = one if variant == "nog" else torch.sigmoid(z("o") + peep["o"] * c)
    return (o * c if variant == "noaf" else o * torch.tanh(c)), c


def run_sequence(variant, params, xs, h0, c0, masks=None):
    """One sequence through the network: xs (L, in) its valid steps, h0, c0 (L*D, H).

    masks[k] (layer-direction k), for zoneout and recurrent dropout: {"keep_h": (L, P
    or H) 0/1 masks or a probability p_h, "keep_c": likewise for c, "drop": (4, R) or
    None, "drop_x": (4, in) input dropout's masks of the layer-direction or None}, indexed by the sequence's valid steps in time order. Zoneout (Krueger et al.
    2017) after the step (and its projection): h_t = k_h h_{t-1} + (1 - k_h) h̃_t, c_t
    likewise; the output is the zoned h_t.
    Returns (ys (L, D*H), h_n (L*D, H), c_n (L*D, H)).
    """
    num_directions = len(params[0])
    layer_input = xs
    h_n, c_n = [], []
    for layer, layer_params in enumerate(params):
        outputs = []
        for direction, p in enumerate(layer_params):
            k = layer * num_directions + direction
            order = range(len(xs)) if direction == 0 else range(len(xs) - 1, -1, -1)
            h, c = h0[k], c0[k]
            ys = [None] * len(xs)
            m = {} if masks is None else masks[k]
            for t in order:
                h_prev, c_prev = h, c
                if variant in LAYER_NORMS:
                    h, c = layer_norm_step(
                        variant, layer_input[t], h, c, p, m.get("drop"), m.get("drop_x")
                    )
                else:
                    h, c = step(
                        variant, layer_input[t], h, c, p["W"], p["U"], p["b"], p.get("p"),
                        m.get("drop"), m.get("drop_x"),
                    )  # fmt: skip
                if "W_hr" in p:
                    h = h @ p["W_hr"]  # the projection: m_t W_hr
                h = _zone(m.get("keep_h"), t, h_prev, h)
                c = _zone(m.get("keep_c"), t, c_prev, c)
                ys[t] = h
            outputs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=-1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def _zone(keep, t, previous, new):
    """Zoneout's k previous + (1 - k) new, k step t's mask or a probability."""
    if keep is None:
        return new
    k = keep if isinstance(keep, float) else keep[t]
    return k * previous + (1 - k) * new


def _sequence_masks(masks, t, n):
    """The masks of sequence n at its valid steps t (see ``oracle``'s ``masks``)."""
    if masks is None:
        return None

    def pick(keep):
        if keep is None or isinstance(keep, float):
            return keep
        return torch.tensor(np.asarray(keep, np.float64)[t, n])

    return [
        {
            "keep_h": pick(m.get("keep_h")),
            "keep_c": pick(m.get("keep_c")),
            "drop": None if m.get("drop") is None else torch.tensor(np.asarray(m["drop"])[n]),
            "drop_x": (
                None if m.get("drop_x") is None else torch.tensor(np.asarray(m["drop_x"])[n])
            ),
        }
        for m in masks
    ]


def oracle(variant, params, x, h0, c0, lengths, dy, dh_n, dc_n, mask=None, masks=None):
    """Outputs and gradients of the README's LSTM, float64 NumPy, time-major.

    params[layer][direction] = {"W", "U", "b"[, "p"][, "W_hr"]} (NumPy); x (T, B, in);
    h0, dh_n (L*D, B, P or H); c0, dc_n (L*D, B, H); lengths (B,) or None;
    mask (B, T) booleans (True at a real step, any pattern) or None, instead of
    lengths: sequence n is then the steps where mask[n] is True, in order;
    dy (T, B, D*(P or H)).
    masks[k] (layer-direction k): zoneout and recurrent dropout, {"keep_h": (T, B, P or
    H) or a float, "keep_c": (T, B, H) or a float, "drop": (B, 4, R) or None, "drop_x":
    (B, 4, in of the layer) or None}, indexed
    by x's time axis (see ``run_sequence``).
    The gradients are those of sum(y*dy) + sum(h_n*dh_n) + sum(c_n*dc_n).
    Returns {"y", "h_n", "c_n", "grads", "dx", "dh0", "dc0"}.
    """
    require_torch()
    steps, batch = x.shape[0], x.shape[1]
    if mask is not None:
        assert lengths is None, "oracle: lengths or mask, not both"
        real = [np.flatnonzero(np.asarray(row, bool)) for row in mask]
    else:
        lengths = [steps] * batch if lengths is None else [int(n) for n in lengths]
        real = [np.arange(length) for length in lengths]
    leaves = [
        [
            {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
            for p in layer
        ]
        for layer in params
    ]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h0t = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
    c0t = torch.tensor(c0, dtype=torch.float64, requires_grad=True)
    width = dy.shape[-1]
    y = torch.zeros(steps, batch, width, dtype=torch.float64)
    h_n, c_n = torch.zeros_like(h0t), torch.zeros_like(c0t)
    loss = torch.zeros((), dtype=torch.float64)
    for n, t in enumerate(real):
        if len(t):
            ys, hs, cs = run_sequence(
                variant, leaves, xt[t, n], h0t[:, n], c0t[:, n], _sequence_masks(masks, t, n)
            )
            loss = loss + (ys * torch.tensor(dy[t, n])).sum()
            y[t, n] = ys.detach()
        else:  # no real step: the initial state is the final one
            hs, cs = h0t[:, n], c0t[:, n]
        loss = loss + (hs * torch.tensor(dh_n[:, n])).sum() + (cs * torch.tensor(dc_n[:, n])).sum()
        h_n[:, n], c_n[:, n] = hs.detach(), cs.detach()
    loss.backward()

    def grad_of(t):
        return np.zeros(tuple(t.shape)) if t.grad is None else t.grad.numpy()

    return {
        "y": y.numpy(),
        "h_n": h_n.numpy(),
        "c_n": c_n.numpy(),
        "grads": [[{k: grad_of(v) for k, v in p.items()} for p in layer] for layer in leaves],
        "dx": grad_of(xt),
        "dh0": grad_of(h0t),
        "dc0": grad_of(c0t),
    }
