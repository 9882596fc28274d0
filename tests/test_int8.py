"""int8 dynamic quantisation (``lstm_multi.torch.quantize_dynamic``, ``QuantizedLSTM``).

The bound. Against the oracle (tests/oracle.py) on the dequantised weights the int8
module differs only by how its activations are quantised, per product and per call
(``backends/torch_int8``'s doc): the reference here quantises them as fbgemm does
(``torch._choose_qparams_per_tensor(a, reduce_range=True)``, then
``quantize_per_tensor``, checked equal to ``quantized::linear_dynamic`` to ~1e-6 on its
own in ``test_fake_quantisation_is_fbgemm_s``) and hands the rest to ``oracle.step``:
the arithmetic left is float32 rounding (~1e-6 a step over these few steps), so
``EMULATED_TOL = 1e-4``, a hundred times that, with room for an activation lying on a
rounding boundary in one run and not the other (a step of s_a |w| ~ 1e-3 in one
entry, rare: none in these seeds).

Against the float module (float weights, float activations) the error is the
quantisation itself: per product entry at most (s_a / 2) sum_i |w_ij| + (s_j / 2)
sum_i |a_i| (+ the cross term), with s_a = range(a) / 127 and s_j = max_i |w_ij| / 127.
Here (inputs |x| < 4, so range(x) < 8; |h| < 1; I = 5, H = 8, weights |w| <= 1/sqrt(8))
that is <= 8/254 * 5 * 0.36 + 0.36/254 * 5 * 4 + (2/254 * 8 * 0.36 + 0.36/254 * 8) ~
0.08 on a preactivation, worst case (all errors of one sign), and the gates' slopes
(sigmoid <= 1/4, tanh <= 1) with forget gates below 1 keep the state's error near one
step's; typical errors are ~1/sqrt(n) of the worst case. ``FLOAT_TOL = 0.1`` on outputs
in (-1, 1); measured: up to ~0.01.
"""

from __future__ import annotations

import io
import warnings

import oracle
import pytest

torch = pytest.importorskip("torch")

from conftest import thorough_params  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from lstm_multi.backends import torch_int8  # noqa: E402
from lstm_multi.torch import LSTM, QuantizedLSTM, quantize_dynamic  # noqa: E402

EMULATED_TOL = 1e-4
FLOAT_TOL = 0.1

VARIANTS = thorough_params(
    oracle.VARIANTS, ["lstm", "peephole", "peephole_full", "cifg", "layernorm_peephole"]
)


def _module(variant="lstm", layers=1, bidirectional=False, proj_size=0, batch_first=False):
    torch.manual_seed(0)
    return LSTM(
        5, 8, layers, batch_first=batch_first, bidirectional=bidirectional,
        proj_size=proj_size, variant=variant,
    ).eval()  # fmt: skip


def _input(steps=6, batch=3, batch_first=False):
    torch.manual_seed(1)
    shape = (batch, steps, 5) if batch_first else (steps, batch, 5)
    return (torch.rand(shape) * 2 - 1) * 3.9


def _fake_quantised(a):
    """a as fbgemm's dynamic quantisation sees it: per tensor, 7 bits (reduce_range)."""
    scale, zero = torch._choose_qparams_per_tensor(a, True)
    return torch.quantize_per_tensor(a, scale, zero, torch.quint8).dequantize()


def _row_fake_quantised(a):
    """a quantised row by row: each row scaled to a max |a| of 1, fake-quantised, and
    scaled back (the layer norms' int8 products)."""
    scale = a.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _fake_quantised(a / scale) * scale


def _emulated(variant, params, x, h0, c0):
    """The int8 network, time-major and batched, from ``oracle.step`` on the dequantised
    weights and fake-quantised activations: z = [q(x_t), q(r)] [W; U] + b (the step's
    U given as zero, so r enters through the stacked product only); the layer norms
    from ``oracle.layer_norm_step`` on q(x_t) and q(h_{t-1}); full sequences."""
    layer_input, h_n, c_n = x, [], []
    for layer, directions in enumerate(params):
        outputs = []
        for direction, p in enumerate(directions):
            k = layer * len(directions) + direction
            xs = layer_input.flip(0) if direction == 1 else layer_input
            steps, batch, size = xs.shape
            rows = xs.reshape(steps * batch, size)
            quantise = _row_fake_quantised if variant in oracle.LAYER_NORMS else _fake_quantised
            xq = quantise(rows).reshape(steps, batch, size)
            stacked = torch.cat([p["W"], p["U"]], 0)
            h, c, ys = h0[k], c0[k], []
            for t in range(steps):
                r = c if variant == "peephole_full" else h
                if variant in oracle.LAYER_NORMS:  # x_t W and r U normalised apart, each
                    # row of an activation quantised on its own scale (torch_int8's doc)
                    m, c = oracle.layer_norm_step(variant, xq[t], _row_fake_quantised(r), c, p)
                else:
                    a = torch.cat([xq[t], _fake_quantised(r)], -1)
                    no_u = torch.zeros(r.shape[-1], p["U"].shape[1])
                    m, c = oracle.step(variant, a, h, c, stacked, no_u, p["b"], p.get("p"))
                h = m if "W_hr" not in p else _fake_quantised(m) @ p["W_hr"]
                ys.append(h)
            y = torch.stack(ys)
            outputs.append(y.flip(0) if direction == 1 else y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, -1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def test_fake_quantisation_is_fbgemm_s():
    """The reference's activation quantisation is what ``linear_dynamic`` does."""
    torch.manual_seed(2)
    w, b = torch.randn(32, 16) * 0.3, torch.randn(32)
    weight = torch_int8.pack(torch_int8.quantize_weight(w), b)
    a = torch.randn(7, 16) * 2 + 0.3
    expected = _fake_quantised(a) @ weight.weight.dequantize().T + b
    assert torch.allclose(weight(a), expected, atol=1e-5)
    assert (weight(a) - (a @ w.T + b)).abs().max() > 1e-3  # and int8 is not float


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layers, bidirectional, proj_size", [(1, False, 0), (2, True, 3)])
def test_int8_agrees_with_the_oracle_on_dequantised_weights(
    variant, layers, bidirectional, proj_size
):
    module = _module(variant, layers, bidirectional, proj_size)
    quantised = quantize_dynamic(module)
    assert isinstance(quantised, QuantizedLSTM)
    x = _input()
    torch.manual_seed(3)
    h0 = torch.randn(layers * (1 + bidirectional), 3, proj_size or 8) * 0.5
    c0 = torch.randn(layers * (1 + bidirectional), 3, 8) * 0.5
    with torch.no_grad():
        y, (h_n, c_n) = quantised(x, (h0, c0))
        expected = _emulated(variant, quantised.dequantized_params(), x, h0, c0)
        y_float, (h_float, c_float) = module(x, (h0, c0))
    # a layer norm centres and divides by its row's deviation, so it scales the products'
    # int8 error up (0.19 seen on these +-3.9 inputs at H=8); on a trained model it is as
    # exact as the rest: examples/int8_digits.py gives float32's accuracy and predictions
    near_float = FLOAT_TOL * (2.5 if variant in oracle.LAYER_NORMS else 1)
    for got, want, floated in zip(
        (y, h_n, c_n), expected, (y_float, h_float, c_float), strict=True
    ):
        assert (got - want).abs().max() < EMULATED_TOL
        assert (got - floated).abs().max() < near_float
    # int8 really ran: float arithmetic would sit ~1e-6 from the float module
    assert (y - y_float).abs().max() > 1e-4


@pytest.mark.parametrize("proj_size", [0, 3])
def test_the_int8_products_run_and_the_weights_are_int8(proj_size):
    quantised = quantize_dynamic(_module("peephole", 2, True, proj_size))
    for layer in quantised._qparams:
        for q in layer:
            for key in ("W", "U", *(("W_hr",) if proj_size else ())):
                weight, _ = torch.ops.quantized.linear_unpack(q[key].packed)
                assert weight.dtype == torch.qint8
                assert weight.qscheme() == torch.per_channel_affine
    steps = 6
    with torch.profiler.profile() as profile, torch.no_grad():
        quantised(_input(steps))
    calls = sum(e.count for e in profile.key_averages() if e.key == torch_int8.LINEAR_DYNAMIC)
    per_direction = 1 + steps * (2 if proj_size else 1)  # x W, then r U (and m W_hr) a step
    assert calls == 4 * per_direction


@pytest.mark.parametrize("variant", ["lstm", "peephole_full"])
def test_lengths_packed_masks_batch_first_and_unbatched(variant):
    module = _module(variant, 2, True, 0, batch_first=True)
    quantised = quantize_dynamic(module)
    x = _input(batch_first=True)
    lengths = torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    with torch.no_grad():
        y_packed, (h_packed, c_packed) = quantised(packed)
        y_packed, _ = pad_packed_sequence(y_packed, batch_first=True, total_length=6)
        y_mask, (h_mask, c_mask) = quantised(x, mask=mask)
        y_float, (h_float, c_float) = module(x, mask=mask)
        y_one, (h_one, _) = quantised(x[0])
        y_batched, (h_batched, _) = quantised(x[:1])
    # the same batch, the same products: packed and a right-padded mask are one computation
    assert torch.equal(y_packed, y_mask) and torch.equal(h_packed, h_mask)
    assert torch.equal(c_packed, c_mask)
    assert not y_mask[~mask].any()  # padding never leaks
    assert (y_mask - y_float).abs().max() < FLOAT_TOL
    assert (h_mask - h_float).abs().max() < FLOAT_TOL and (c_mask - c_float).abs().max() < FLOAT_TOL
    assert torch.equal(y_one, y_batched[0]) and torch.equal(h_one, h_batched[:, 0])
    assert y_one.shape == (6, 16)
    with torch.no_grad():
        y_empty, (h_empty, _) = quantised(x[:0])
    assert y_empty.shape == (0, 6, 16) and h_empty.shape == (4, 0, 8)


@pytest.mark.parametrize("variant", ["peephole", "layernorm"])
def test_the_array_code_path_agrees_with_the_kernel_step(variant, monkeypatch):
    quantised = quantize_dynamic(_module(variant, 1, False, 3))
    x = _input()
    with torch.no_grad():
        kernels = quantised(x)[0]
        monkeypatch.setattr(torch_int8, "cpu_kernels", lambda variant, scalar: None)
        array = quantised(x)[0]
    assert (kernels - array).abs().max() < EMULATED_TOL


def test_state_dict_and_pickle_round_trip():
    quantised = quantize_dynamic(_module("cifg", 2, True, 3))
    state = quantised.state_dict()
    assert state["weight_ih_l0"].dtype == torch.qint8 and state["bias_l0"].dtype == torch.float32
    other = quantize_dynamic(LSTM(5, 8, 2, bidirectional=True, proj_size=3, variant="cifg"))
    other.load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(quantised, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True: the packed weights are rebuilt
    x = _input()
    with torch.no_grad():
        assert torch.equal(other(x)[0], quantised(x)[0])
        assert torch.equal(loaded(x)[0], quantised(x)[0])


def test_refusals_name_the_argument():
    quantised = quantize_dynamic(_module())
    with pytest.raises(RuntimeError, match="inference only"):
        quantised.train()
    with pytest.raises(RuntimeError, match="inference only.*no_grad"):
        quantised(_input().requires_grad_(True))
    with pytest.raises(ValueError, match="dtype: expected torch.qint8"):
        quantize_dynamic(_module(), dtype=torch.float16)
    with pytest.raises(ValueError, match="module: expected a float32 module on the CPU"):
        quantize_dynamic(_module().double())
    with pytest.raises(TypeError, match="module: expected a lstm_multi.torch.LSTM"):
        QuantizedLSTM(nn.LSTM(5, 8))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        quantize_dynamic("model")
    with pytest.raises(TypeError, match="input: expected dtype torch.float32"):
        quantised(_input().double())
    assert not list(quantised.parameters())  # nothing for an optimiser to train


def _torch_quantised(lstm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(lstm, {nn.LSTM, nn.Linear})


def test_native_route_is_torch_s_own_quantised_lstm():
    """``native=True``: a plain module becomes exactly what torch makes of its nn.LSTM;
    a projection or another variant still becomes ours."""
    module = _module("lstm", 2, True)
    ours = quantize_dynamic(module, native=True)
    theirs = _torch_quantised(nn.Sequential(module.to_torch()))[0]  # (children only)
    assert type(ours) is type(theirs) is torch.ao.nn.quantized.dynamic.LSTM
    x = _input()
    with torch.no_grad():
        y, (h, c) = ours(x)
        y_torch, (h_torch, c_torch) = theirs(x)
        y_float = module(x)[0]
    assert torch.equal(y, y_torch) and torch.equal(h, h_torch) and torch.equal(c, c_torch)
    assert (y - y_float).abs().max() < FLOAT_TOL
    assert isinstance(quantize_dynamic(_module("lstm", proj_size=3), native=True), QuantizedLSTM)
    assert isinstance(quantize_dynamic(_module("peephole"), native=True), QuantizedLSTM)


def test_torch_s_quantize_dynamic_leaves_ours_float_unless_given_the_mapping():
    """What docs/deployment.md says: torch's default call leaves an lstm_multi LSTM float
    (exact-type matching), our function and torch's with our mapping quantise it, and an
    nn.Linear beside it quantises as torch quantises it either way."""
    from torch.ao.quantization.quantization_mappings import (
        get_default_dynamic_quant_module_mappings,
    )

    model = nn.Sequential(_module("peephole"), nn.Identity())
    model.append(nn.Linear(4, 2))
    assert type(_torch_quantised(model)[0]) is LSTM
    mapping = {**get_default_dynamic_quant_module_mappings(), LSTM: QuantizedLSTM}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = torch.ao.quantization.quantize_dynamic(model, {LSTM, nn.Linear}, mapping=mapping)
        ours = quantize_dynamic(model)
    assert type(mapped[0]) is type(ours[0]) is QuantizedLSTM
    assert type(ours[2]) is torch.ao.nn.quantized.dynamic.Linear
    assert type(model[0]) is LSTM  # the float model is left as it was
    x = _input()
    with torch.no_grad():
        assert torch.equal(mapped[0](x)[0], ours[0](x)[0])


@pytest.mark.parametrize("proj_size", [0, 3])
def test_a_mask_with_gaps_holds_the_state_and_zeroes_the_output(proj_size):
    module = _module("peephole", 1, True, proj_size, batch_first=True)
    quantised = quantize_dynamic(module)
    x = _input(batch_first=True)
    mask = torch.tensor(
        [[True] * 6, [False, True, False, True, True, False], [False] * 6], dtype=torch.bool
    )
    with torch.no_grad():
        y, (h_n, c_n) = quantised(x, mask=mask)
        y_float, (h_float, c_float) = module(x, mask=mask)
    assert not y[~mask].any()
    assert (y - y_float).abs().max() < FLOAT_TOL and (h_n - h_float).abs().max() < FLOAT_TOL
    assert not h_n[:, 2].any() and not c_n[:, 2].any()  # no real step: the zero initial state


def test_torch_s_mapping_with_a_float16_qconfig_is_refused():
    from torch.ao.quantization.quantization_mappings import (
        get_default_dynamic_quant_module_mappings,
    )

    mapping = {**get_default_dynamic_quant_module_mappings(), LSTM: QuantizedLSTM}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="qconfig: QuantizedLSTM takes qint8 weights"):
            torch.ao.quantization.quantize_dynamic(
                nn.Sequential(_module()), {LSTM}, dtype=torch.float16, mapping=mapping
            )


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "onednn", "qnnpack"])
def test_every_quantised_engine_keeps_the_accuracy(engine, monkeypatch):
    """Packed on any engine, a product takes the activation width that engine needs:
    with 8 bits, fbgemm, x86 and onednn saturate their int16 sums (0.26 off here)."""
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch here has no {engine} engine")
    monkeypatch.setattr(torch.backends.quantized, "engine", engine)
    torch.manual_seed(4)
    w, r = torch.randn(1024, 256) * 0.05, torch.rand(8, 256) * 2 - 1
    weight = torch_int8.pack(torch_int8.quantize_weight(w))
    # the bound of the module doc, all terms of one sign: (s_a / 2) sum |w| + (s_j / 2) sum |r|
    s_a, s_j = 2 / 127, w.abs().amax(1) / 127
    bound = (
        (s_a / 2) * w.abs().sum(1) + (s_j / 2) * r.abs().sum(1, keepdim=True) + 256 * s_a * s_j / 4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qnnpack: "ignores reduce_range"
        error = (weight(r) - r @ w.T).abs()
    assert (error <= bound).all()
    quantised = quantize_dynamic(_module("peephole", 1, False, 3))  # and the module runs there
    with torch.no_grad():
        assert quantised(_input())[0].shape == (6, 3, 3)


def test_a_module_with_zoneout_is_refused():
    """Zoneout changes the evaluation output (the expectation blend), which the int8 loop
    does not run: refused by name instead of quantised into another function.
    Recurrent and input dropout and DropConnect act in training only, so those modules
    quantise."""
    model = LSTM(3, 4, variant="peephole", zoneout=0.3).eval()
    with pytest.raises(ValueError, match="module: its zoneout"):
        quantize_dynamic(model)
    for kw in (dict(recurrent_dropout=0.3), dict(dropconnect=0.3), dict(input_dropout=0.3)):
        model = LSTM(3, 4, variant="peephole", **kw).eval()
        x = torch.randn(5, 2, 3)
        with torch.no_grad():
            assert (quantize_dynamic(model)(x)[0] - model(x)[0]).abs().max() < 0.1
