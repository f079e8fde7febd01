"""Models with the cell options (reverse, peepholes, clip, input_forget,
activations) against the oracle, forward and every gradient, with every
storage kind, layers, directions, lengths and checkpointing; their streams,
pools, files and device runs."""

import json

import numpy as np
import pytest
import reference
from helpers import assert_grads_match, cuda_or_skip, ref_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, dense64, sparsify

import numlstm

SPECS = st.sampled_from(["sigmoid", "tanh", "relu", "hard_sigmoid", "affine",
                         ("hard_sigmoid", 0.3, 0.45), ("affine", 0.5, 0.1)])


@st.composite
def cell_options(draw, D):
    """Keyword arguments of the LSTM for a random mix of the cell options."""
    opts = {}
    if D == 1 and draw(st.booleans()):
        opts["reverse"] = True
    if draw(st.booleans()):
        opts["peepholes"] = True
    clip = draw(st.sampled_from([None, None, 0.5, 3.0]))
    if clip is not None:
        opts["clip"] = clip
    if draw(st.booleans()):
        opts["input_forget"] = True
    if draw(st.booleans()):
        opts["activations"] = (draw(SPECS), draw(SPECS), draw(SPECS))
    return opts


def build(cfg, opts):
    rng = np.random.default_rng(cfg.seed)
    m = numlstm.LSTM(cfg.I, cfg.H, **cfg.model_kwargs(), **opts)
    m.load_state_dict(sparsify(m.state_dict(), cfg, rng))
    x = rng.standard_normal((cfg.T, cfg.B, cfg.I)).astype(cfg.dtype)
    h0 = rng.standard_normal((cfg.D * cfg.L, cfg.B, cfg.O)).astype(cfg.dtype)
    c0 = rng.standard_normal((cfg.D * cfg.L, cfg.B, cfg.H)).astype(cfg.dtype)
    return m, x, h0, c0, rng


def close(got, want, dtype, what):
    # relu and affine activations are unbounded: the tolerance scales with the values.
    scale = max(1.0, float(np.abs(want).max(initial=0)))
    tol = dict(rtol=2e-3, atol=2e-4 * scale) if dtype == np.float32 else \
        dict(rtol=1e-9, atol=1e-10 * scale)
    np.testing.assert_allclose(got, want, err_msg=what, **tol)


@settings(max_examples=60, deadline=None)
@given(cfg=configs(max_L=2), data=st.data())
def test_variant_models_match_the_oracle(cfg, data):
    opts = data.draw(cell_options(cfg.D))
    checkpoint = data.draw(st.sampled_from([None, 2]))
    m, x, h0, c0, rng = build(cfg, opts)
    y, (h, c) = m(x, (h0, c0), lengths=cfg.lengths, training=True, checkpoint=checkpoint)
    state = dense64(m.state_dict())
    ry, rh, rc, cache = reference.lstm_forward(state, x, h0=h0, c0=c0, **ref_kwargs(cfg),
                                               **{k: v for k, v in opts.items()
                                                  if k != "peepholes"})
    close(y, ry, cfg.dtype, "y")
    close(h, rh, cfg.dtype, "h_n")
    close(c, rc, cfg.dtype, "c_n")

    dy = rng.standard_normal(y.shape).astype(cfg.dtype)
    dh, dc = (rng.standard_normal(a.shape).astype(cfg.dtype) for a in (h, c))
    dx, (dh0, dc0) = m.backward(dy, (dh, dc))
    rdx, rdh0, rdc0, rgrads = reference.lstm_backward(cache, dy, dh, dc)
    close(dx, rdx, cfg.dtype, "dx")
    close(dh0, rdh0, cfg.dtype, "dh0")
    close(dc0, rdc0, cfg.dtype, "dc0")
    scale = max([1.0] + [float(np.abs(g).max(initial=0)) for g in rgrads.values()])
    tol = dict(rtol=2e-3, atol=2e-4 * scale) if cfg.dtype == np.float32 else \
        dict(rtol=1e-9, atol=1e-10 * scale)
    assert_grads_match(m, rgrads, tol)


def test_peepholes_are_parameters_that_train():
    m = numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, peepholes=True, seed=0)
    names = [n for n in m.state_dict() if n.startswith("peephole")]
    assert names == ["peephole_l0", "peephole_l0_reverse", "peephole_l1",
                     "peephole_l1_reverse"]
    assert all(m.state_dict()[n].shape == (3, 4) for n in names)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y, _ = m(x, training=True)
    m.backward(np.ones_like(y))
    assert all(np.abs(m.grad[n]).max() > 0 for n in names)
    assert set(m.parameters()) == set(m.grad_arrays()) >= set(names)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="reverse=True is a layer that runs only backwards"):
        numlstm.LSTM(2, 3, bidirectional=True, reverse=True)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        numlstm.LSTM(2, 3, reverse="yes")
    with pytest.raises(ValueError, match="clip must be > 0"):
        numlstm.LSTM(2, 3, clip=-1.0)
    with pytest.raises(ValueError, match=r"activations\[0\]"):
        numlstm.LSTM(2, 3, activations=("gelu", "tanh", "tanh"))
    m = numlstm.LSTM(2, 3, reverse=True)
    with pytest.raises(ValueError, match="a reverse model cannot stream"):
        m.stream()
    with pytest.raises(ValueError, match="a reverse model cannot stream"):
        numlstm.StreamPool(m, 4)


def test_repr_names_the_options():
    m = numlstm.LSTM(2, 3, reverse=True, clip=2.0, activations=("hard_sigmoid", "relu", "tanh"))
    assert "reverse=True, clip=2.0, activations=('hard_sigmoid', 'relu', 'tanh')" in repr(m)
    assert "reverse" not in repr(numlstm.LSTM(2, 3))


def test_variant_streams_and_pools_equal_the_forward():
    m = numlstm.LSTM(3, 5, num_layers=2, proj_size=2, peepholes=True, clip=1.5,
                     input_forget=True, activations=("hard_sigmoid", "tanh", "relu"),
                     dtype=np.float64, seed=1)
    x = np.random.default_rng(1).standard_normal((6, 2, 3))
    y, _ = m(x)
    s = m.stream(2)
    np.testing.assert_allclose(np.stack([s.step(x[t]).copy() for t in range(6)]), y,
                               rtol=1e-12, atol=1e-12)
    pool = m.stream_pool(4)
    a, b = pool.open(), pool.open()
    out = np.stack([pool.step(np.array([a, b]), x[t]).copy() for t in range(6)])
    np.testing.assert_allclose(out, y, rtol=1e-12, atol=1e-12)


def test_options_survive_save_and_load(tmp_path):
    m = numlstm.LSTM(3, 4, reverse=True, peepholes=True, clip=2.5, input_forget=True,
                     activations=(("affine", 0.5, 0.1), "relu", "hard_sigmoid"), seed=2)
    numlstm.save(m, tmp_path / "m.npz")
    back = numlstm.load(tmp_path / "m.npz")
    assert back.reverse and back.cell == m.cell
    x = np.random.default_rng(2).standard_normal((4, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], m(x)[0])


def test_version_1_files_load_as_the_plain_cell(tmp_path):
    """A file written before the options (format version 1: no option keys)."""
    m = numlstm.LSTM(3, 4, seed=3)
    numlstm.save(m, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    header = json.loads(arrays["header"].tobytes())
    assert header["version"] == 2
    header["version"] = 1
    for key in ("reverse", "peepholes", "clip", "input_forget", "activations"):
        del header["config"][key]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "v1.npz", **arrays)
    back = numlstm.load(tmp_path / "v1.npz")
    assert back.cell.plain and not back.reverse
    x = np.random.default_rng(3).standard_normal((4, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], m(x)[0])


def test_variant_model_on_the_device_equals_the_cpu():
    cuda_or_skip()
    kw = dict(num_layers=1, reverse=True, peepholes=True, clip=2.0, input_forget=True,
              activations=("hard_sigmoid", "relu", "tanh"), dtype=np.float64, seed=4)
    cpu = numlstm.LSTM(2, 3, **kw)
    dev = numlstm.LSTM(2, 3, **kw).to("cuda")
    x = np.random.default_rng(4).standard_normal((3, 2, 2))
    lengths = np.array([3, 2])
    y, _ = cpu(x, lengths=lengths, training=True)
    yd, _ = dev(x, lengths=lengths, training=True, to_host=True)
    np.testing.assert_allclose(yd, y, rtol=1e-12, atol=1e-12)
    dx, _ = cpu.backward(np.ones_like(y))
    dxd, _ = dev.backward(np.ones_like(y), to_host=True)
    np.testing.assert_allclose(dxd, dx, rtol=1e-12, atol=1e-12)
    dev.to("cpu")
    for name, g in cpu.grad.items():
        np.testing.assert_allclose(dev.grad[name], g, rtol=1e-12, atol=1e-12, err_msg=name)


def test_memory_report_counts_the_peepholes():
    m = numlstm.LSTM(3, 4, num_layers=2, peepholes=True, seed=6)
    report = numlstm.memory_report(m, 5, 2)
    assert report["peepholes"] == 2 * 3 * 4 * 4  # two (3, H) float32 parameters
    weights = sum(v for k, v in report.items() if k.startswith("weight"))
    assert weights + report["biases"] + report["peepholes"] == m.weight_bytes()


def test_cli_info_names_the_cell(tmp_path, capsys):
    from numlstm.cli import main

    m = numlstm.LSTM(3, 4, reverse=True, clip=2.0, seed=7)
    numlstm.save(m, tmp_path / "m.npz")
    assert main(["info", str(tmp_path / "m.npz")]) == 0
    out = capsys.readouterr().out
    assert "cell: clip 2; activations (sigmoid, tanh, tanh); every layer runs backwards" in out


@pytest.mark.parametrize("opts", [
    dict(reverse=True, peepholes=True, clip=0.8),
    dict(peepholes=True, input_forget=True, activations=(("hard_sigmoid", 0.3, 0.45), "relu",
                                                          ("affine", 0.5, 0.1))),
])
def test_finite_differences_on_the_model(opts):
    """The model's own gradients (peepholes included) against central differences
    of its own forward, float64, at 12 random entries per parameter."""
    m = numlstm.LSTM(3, 4, num_layers=2, dtype=np.float64, seed=8, **opts)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 2, 3))
    lengths = np.array([5, 3])
    r = rng.standard_normal((5, 2, 4))
    y, _ = m(x, lengths=lengths, training=True)
    m.zero_grad()
    m.backward(r)
    params, grads = m.parameters(), m.grad_arrays()
    for name, p in params.items():
        for idx in map(tuple, rng.integers(0, p.shape, size=(12, p.ndim))):
            saved = p[idx]
            p[idx] = saved + 1e-6
            up = np.sum(m(x, lengths=lengths)[0] * r)
            p[idx] = saved - 1e-6
            down = np.sum(m(x, lengths=lengths)[0] * r)
            p[idx] = saved
            num = (up - down) / 2e-6
            assert abs(grads[name][idx] - num) <= 1e-6 * max(1.0, abs(num)), (name, idx)


@pytest.mark.parametrize("storage", ["bsr", "float16", "int8"])
def test_variant_cells_with_every_storage_kind(storage):
    """BSR trains with the options; float16 / int8 CSR (inference only) run
    them: forward (and for BSR every gradient) against the oracle on the
    weights as stored."""
    from numlstm import prune, quantize

    opts = dict(peepholes=True, clip=1.5, input_forget=True,
                activations=(("hard_sigmoid", 0.3, 0.45), "tanh", "relu"))
    m = numlstm.LSTM(4, 8, num_layers=2, dtype=np.float32, seed=9, **opts)
    if storage == "bsr":
        prune.blocks(m, 0.5, block=(4, 2))
    else:
        prune.magnitude(m, 0.5, scope="per_row")
        quantize.quantize(m, storage)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    training = storage == "bsr"
    y, (h, c) = m(x, lengths=lengths, training=training)
    ry, rh, rc, cache = reference.lstm_forward(
        dense64(m.state_dict()), x, hidden_size=8, num_layers=2, lengths=lengths,
        **{k: v for k, v in opts.items() if k != "peepholes"})
    for got, want, what in ((y, ry, "y"), (h, rh, "h_n"), (c, rc, "c_n")):
        close(got, want, np.float32, what)
    if training:
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx, _ = m.backward(dy)
        rdx, _, _, rgrads = reference.lstm_backward(cache, dy)
        close(dx, rdx, np.float32, "dx")
        for name, g in m.grad.items():
            g = g.toarray() if hasattr(g, "toarray") else g
            want = rgrads[name] * (dense64(m.state_dict())[name] != 0) \
                if name.startswith("weight") else rgrads[name]
            close(g, want, np.float32, name)
