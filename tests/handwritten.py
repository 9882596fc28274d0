"""The hand-written gate backwards the library ran before its backward was derived.

Kept as a test oracle only: per unit, as they were written in ``spec.py``
(same lines, same order), over any values that support ``+ - *`` and the
two functions passed in. Evaluated with NumPy they check the derived backward's
numbers; traced (``lstm_multi.compile.trace``) they give its operation count to
compare with the derived one's.

Each takes the cache the old code kept, ``(i, f, g, o, c_prev, c, act)`` with
``act`` = tanh(c) ("lstm", "peephole") or h ("peephole_full"), and returns
``(dz_i, dz_f, dz_g, dz_o, dc_prev, *peephole terms)``.
"""

from __future__ import annotations


def lstm(dh, dc, cache, p=None):
    i, f, g, o, c_prev, _, tanh_c = cache
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    dzi = dc * g * i * (1 - i)
    dzf = dc * c_prev * f * (1 - f)
    dzg = dc * i * (1 - g * g)
    dzo = dh * tanh_c * o * (1 - o)
    return dzi, dzf, dzg, dzo, dc * f


def peephole(dh, dc, cache, p):
    p_i, p_f, p_o = p
    i, f, g, o, c_prev, c, tanh_c = cache
    dzo = dh * tanh_c * o * (1 - o)
    dc = dc + dh * o * (1 - tanh_c * tanh_c) + dzo * p_o
    dzi = dc * g * i * (1 - i)
    dzf = dc * c_prev * f * (1 - f)
    dzg = dc * i * (1 - g * g)
    dc_prev = dc * f + dzi * p_i + dzf * p_f
    return dzi, dzf, dzg, dzo, dc_prev, dzi * c_prev, dzf * c_prev, dzo * c


def peephole_full(dh, dc, cache, p=None):
    i, f, g, o, c_prev, c, h = cache
    d_oc = dh * (1 - h * h)
    dc = dc + d_oc * o
    dzi = dc * g * i * (1 - i)
    dzf = dc * c_prev * f * (1 - f)
    dzg = dc * i * g * (1 - g)
    dzo = d_oc * c * o * (1 - o)
    return dzi, dzf, dzg, dzo, dc * f


def cache_of(name, z, c_prev, p, sigmoid, tanh):
    """The old forward's cache (i, f, g, o, c_prev, c, act) from per-gate values z."""
    z_i, z_f, z_g, z_o = z
    if name == "lstm":
        i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
        c = f * c_prev + i * g
        return i, f, g, o, c_prev, c, tanh(c)
    if name == "peephole":
        i = sigmoid(z_i + p[0] * c_prev)
        f = sigmoid(z_f + p[1] * c_prev)
        g = tanh(z_g)
        c = f * c_prev + i * g
        o = sigmoid(z_o + p[2] * c)
        return i, f, g, o, c_prev, c, tanh(c)
    i, f, g, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_g), sigmoid(z_o)
    c = f * c_prev + i * g
    return i, f, g, o, c_prev, c, tanh(o * c)


BACKWARDS = {"lstm": lstm, "peephole": peephole, "peephole_full": peephole_full}
