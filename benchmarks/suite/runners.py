"""One runner per system: the same LSTM (PyTorch's equations, gates i, f, g, o)
stepped one call per step (``stream``) or over a whole sequence (``sequence``).

Each runner is built from effective dense weights (peers) or a numlstm model
file, imports its library lazily, and is used only inside a worker process.
``stream(xs)`` takes a list of (B, I) inputs made before timing and returns
nothing; ``stream_outputs(xs)`` returns h_t for every step, (T, B, H);
``sequence(seq_input(x))`` takes x (T, B, I) and returns y (T, B, H).
``inputs`` and ``seq_input`` convert NumPy inputs to the runner's own type
before timing.
"""

import numpy as np

from benchmarks.suite.config import ORT_THREADS, TORCH_THREADS


def sizes(w):
    """(I, H) of a weights dict."""
    return w["weight_ih_l0"].shape[1], w["weight_hh_l0"].shape[1]


class Numlstm:
    """numlstm: ``Stream.step`` per step, ``LSTM.forward`` for a sequence."""

    def __init__(self, model, B):
        self.model = model
        self.s = model.stream(batch_size=B)
        self.h = np.empty((B, model.output_size), model.dtype)  # stream's output buffer

    @classmethod
    def load(cls, path, B):
        import numlstm

        return cls(numlstm.load(path), B)

    def inputs(self, xs):
        return xs

    def seq_input(self, x):
        return x

    def stream(self, xs):
        s = self.s
        s.reset()
        h = self.h  # each step's output, reused: the zero-allocation path
        for xt in xs:
            s.step(xt, out=h)

    def stream_outputs(self, xs):
        self.s.reset()
        return np.stack([self.s.step(xt).copy() for xt in xs])

    def sequence(self, x):
        return self.model(x)[0]


def _torch():
    import torch

    torch.set_num_threads(TORCH_THREADS)
    return torch


class TorchCell:
    """torch.nn.LSTMCell in a Python loop, under no_grad."""

    def __init__(self, w, B):
        torch = self.torch = _torch()
        I, H = sizes(w)
        self.B, self.H = B, H
        self.cell = torch.nn.LSTMCell(I, H).eval()
        with torch.no_grad():
            for n, v in w.items():
                getattr(self.cell, n.removesuffix("_l0")).copy_(torch.from_numpy(v))

    def inputs(self, xs):
        return [self.torch.from_numpy(np.ascontiguousarray(xt)) for xt in xs]

    def stream(self, xs):
        torch, cell = self.torch, self.cell
        with torch.no_grad():
            h = torch.zeros(self.B, self.H)
            c = torch.zeros(self.B, self.H)
            for xt in xs:
                h, c = cell(xt, (h, c))

    def stream_outputs(self, xs):
        torch, cell = self.torch, self.cell
        out = []
        with torch.no_grad():
            h = torch.zeros(self.B, self.H)
            c = torch.zeros(self.B, self.H)
            for xt in xs:
                h, c = cell(xt, (h, c))
                out.append(h.numpy().copy())
        return np.stack(out)

    def seq_input(self, x):
        return self.inputs(list(x))

    def sequence(self, xs):
        return self.stream_outputs(xs)


class TorchLSTM:
    """torch.nn.LSTM: one call per step with (h, c) carried, or one call per sequence."""

    def __init__(self, w, B):
        torch = self.torch = _torch()
        I, H = sizes(w)
        self.B, self.H = B, H
        self.lstm = torch.nn.LSTM(I, H)
        with torch.no_grad():
            for n, v in w.items():
                getattr(self.lstm, n).copy_(torch.from_numpy(v))

    def inputs(self, xs):
        return [self.torch.from_numpy(np.ascontiguousarray(xt[None])) for xt in xs]

    def _loop(self, xs, keep):
        torch, lstm = self.torch, self.lstm
        out = []
        with torch.no_grad():
            state = (torch.zeros(1, self.B, self.H), torch.zeros(1, self.B, self.H))
            for xt in xs:
                y, state = lstm(xt, state)
                if keep:
                    out.append(y[0].numpy().copy())
        return out

    def stream(self, xs):
        self._loop(xs, False)

    def stream_outputs(self, xs):
        return np.stack(self._loop(xs, True))

    def sequence(self, x):
        with self.torch.no_grad():
            return self.lstm(x)[0].numpy()

    def seq_input(self, x):
        return self.torch.from_numpy(x)


def export_onnx(w):
    """The bytes of an ONNX model of torch.nn.LSTM with these weights: inputs
    x (T, B, I), h0, c0 (1, B, H); outputs y, hn, cn."""
    import io
    import warnings

    torch = _torch()
    I, H = sizes(w)
    lstm = TorchLSTM(w, 1).lstm
    x, h = torch.zeros(2, 1, I), torch.zeros(1, 1, H)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lstm, (x, (h, h)), f, input_names=["x", "h0", "c0"],
                          output_names=["y", "hn", "cn"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "T", 1: "B"}, "h0": {1: "B"},
                                        "c0": {1: "B"}, "y": {0: "T", 1: "B"}})
    return f.getvalue()


class Ort:
    """ONNX Runtime on torch's export: one ``run`` per step with the state fed
    back, or one ``run`` per sequence."""

    def __init__(self, w, B, onnx_bytes=None):
        import onnxruntime as ort

        I, H = sizes(w)
        self.B, self.H = B, H
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ORT_THREADS
        opts.inter_op_num_threads = 1
        self.onnx_bytes = onnx_bytes or export_onnx(w)
        self.sess = ort.InferenceSession(self.onnx_bytes, opts,
                                         providers=["CPUExecutionProvider"])
        self.zero = np.zeros((1, B, H), np.float32)

    def inputs(self, xs):
        return [np.ascontiguousarray(xt[None]) for xt in xs]

    def seq_input(self, x):
        return x

    def _loop(self, xs, keep):
        run, h, c = self.sess.run, self.zero, self.zero
        out = []
        for xt in xs:
            y, h, c = run(None, {"x": xt, "h0": h, "c0": c})
            if keep:
                out.append(y[0])
        return out

    def stream(self, xs):
        self._loop(xs, False)

    def stream_outputs(self, xs):
        return np.stack(self._loop(xs, True))

    def sequence(self, x):
        return self.sess.run(["y"], {"x": x, "h0": self.zero, "c0": self.zero})[0]


def _sigmoid(z, out):
    """sigmoid(z) = (1 + tanh(z / 2)) / 2, which cannot overflow."""
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


class _Loop:
    """The cell in plain NumPy, float32, buffers made once: subclasses supply
    the two products (``_project`` for x, ``_recur`` for h)."""

    def __init__(self, w, B):
        I, H = sizes(w)
        self.B, self.H = B, H
        self.bias = (w["bias_ih_l0"] + w["bias_hh_l0"]).astype(np.float32)
        self.z = np.empty((B, 4 * H), np.float32)
        self.act = np.empty((B, 4 * H), np.float32)
        self.h = np.zeros((B, H), np.float32)
        self.c = np.zeros((B, H), np.float32)
        self.tc = np.empty((B, H), np.float32)

    def _cell(self):
        H, z, a = self.H, self.z, self.act
        z += self.bias
        _sigmoid(z[:, :2 * H], a[:, :2 * H])
        np.tanh(z[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
        _sigmoid(z[:, 3 * H:], a[:, 3 * H:])
        c = self.c
        c *= a[:, H:2 * H]
        c += a[:, :H] * a[:, 2 * H:3 * H]
        np.tanh(c, out=self.tc)
        np.multiply(a[:, 3 * H:], self.tc, out=self.h)

    def step(self, xt):
        self._project(xt)
        self.z += self._recur(self.h)
        self._cell()
        return self.h

    def reset(self):
        self.h.fill(0)
        self.c.fill(0)

    def inputs(self, xs):
        return xs

    def seq_input(self, x):
        return x

    def stream(self, xs):
        self.reset()
        for xt in xs:
            self.step(xt)

    def stream_outputs(self, xs):
        self.reset()
        return np.stack([self.step(xt).copy() for xt in xs])

    def sequence(self, x):
        T, B, _ = x.shape
        zx = self._project_all(x)  # (T, B, G): the input projection as one product
        self.reset()
        out = np.empty((T, B, self.H), np.float32)
        for t in range(T):
            np.add(zx[t], self._recur(self.h), out=self.z)
            self._cell()
            out[t] = self.h
        return out


class NumpyLoop(_Loop):
    """Dense NumPy: x_t @ W_ih^T + h @ W_hh^T with transposed copies made once."""

    def __init__(self, w, B):
        super().__init__(w, B)
        self.wih_t = np.ascontiguousarray(w["weight_ih_l0"].T)  # (I, G)
        self.whh_t = np.ascontiguousarray(w["weight_hh_l0"].T)  # (H, G)

    def _project(self, xt):
        np.matmul(xt, self.wih_t, out=self.z)

    def _recur(self, h):
        return h @ self.whh_t

    def _project_all(self, x):
        T, B, I = x.shape
        return (x.reshape(T * B, I) @ self.wih_t).reshape(T, B, -1)


class ScipyLoop(_Loop):
    """scipy.sparse: ``W @ v`` per step with CSR (or BSR) weights."""

    def __init__(self, w, B, block=None):
        import scipy.sparse as sp

        super().__init__(w, B)
        make = (lambda a: sp.bsr_array(a, blocksize=block)) if block else sp.csr_array
        self.wih = make(w["weight_ih_l0"])  # (G, I)
        self.whh = make(w["weight_hh_l0"])  # (G, H)

    def weight_bytes(self):
        return sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                   for m in (self.wih, self.whh)) + self.bias.nbytes * 2

    def _project(self, xt):
        self.z[...] = (self.wih @ xt.T).T if self.B > 1 else self.wih @ xt[0]

    def _recur(self, h):
        return (self.whh @ h.T).T if self.B > 1 else self.whh @ h[0]

    def _project_all(self, x):
        T, B, I = x.shape
        return (self.wih @ x.reshape(T * B, I).T).T.reshape(T, B, -1)
