"""Layers around the LSTM: ``Linear`` (dense, CSR or BSR weight) and ``Embedding``.

Both follow the LSTM's conventions: ``forward(x, training=False)``, then
``backward(dy)`` adds into the gradients and returns the input gradient;
``parameters()`` / ``grad_arrays()`` / ``zero_grad()`` / ``state_dict()`` /
``load_state_dict()`` work as on ``numlstm.LSTM``, so the optimizers, the
pruning functions' storage and ``numlstm.fit`` treat them alike.
"""

import numpy as np

from numlstm import weights
from numlstm.checks import check_int
from numlstm.kernels import cpu as cpu_kernels
from numlstm.ops import matmul_batch, sddmm_acc


class _Module:
    """Parameters in ``self._params`` (name -> storage object or array)."""

    def _install(self, params):
        self._params = params
        self._grads = {n: (p.new_grad() if isinstance(p, weights._Weight) else np.zeros_like(p))
                       for n, p in params.items()}
        self._saved = None
        self.version = getattr(self, "version", 0) + 1

    def parameters(self):
        """Live arrays: dense weights, sparse ``.data``, biases; update in place."""
        return {n: (p.values if isinstance(p, weights._Weight) else p)
                for n, p in self._params.items()}

    def grad_arrays(self):
        """Live gradient arrays, shaped like ``parameters()``'s values."""
        return dict(self._grads)

    def zero_grad(self):
        """Set every gradient array to zero, in place (``backward`` adds into them)."""
        for g in self._grads.values():
            g.fill(0)

    def state_dict(self):
        """Copies of the parameters, as ``load_state_dict`` takes them.

        Returns
        -------
        dict
            Name -> array (a dense weight or bias) or scipy sparse matrix (a
            CSR or BSR weight); changing them leaves the module unchanged.
        """
        return {n: (p.public() if isinstance(p, weights._Weight) else p.copy())
                for n, p in self._params.items()}

    def _weights(self):
        return {n: p for n, p in self._params.items() if isinstance(p, weights._Weight)}

    def _saved_input(self):
        if self._saved is None:
            raise RuntimeError("backward needs a preceding forward(..., training=True)")
        saved, self._saved = self._saved, None
        return saved


class Linear(_Module):
    """y = x W^T + b over the last axis; W (out, in) dense, CSR or BSR.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    dtype : np.float32 or np.float64
    seed : int or None
        Initialisation U(-1/sqrt(in), 1/sqrt(in)), as torch.nn.Linear.
    """

    def __init__(self, in_features, out_features, *, bias=True, dtype=np.float32, seed=None):
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.bias = bool(bias)
        rng = np.random.default_rng(seed)
        k = 1 / np.sqrt(self.in_features)
        state = {"weight": rng.uniform(-k, k, (self.out_features, self.in_features))}
        if self.bias:
            state["bias"] = rng.uniform(-k, k, self.out_features)
        self.load_state_dict(state)

    def __repr__(self):
        from numlstm.weights import describe

        return (f"Linear({self.in_features}, {self.out_features}, bias={self.bias}, "
                f"dtype={self.dtype.name}, weight={describe(self._params['weight'])})")

    def load_state_dict(self, state):
        """Replace weight (array or scipy sparse: CSR/BSR as in ``LSTM``) and bias."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        expected = {"weight", "bias"} if self.bias else {"weight"}
        if set(state) != expected:
            raise KeyError(f"state keys must be {sorted(expected)}, got {sorted(state)}")
        params = {"weight": weights.from_value(state["weight"], "weight",
                                         (self.out_features, self.in_features), self.dtype)}
        if self.bias:
            b = weights.check_float_array(state["bias"], "bias", (self.out_features,), self.dtype)
            if not np.all(np.isfinite(b)):
                raise ValueError("bias must be finite, got NaN or inf values")
            params["bias"] = b.copy()
        self._install(params)

    def forward(self, x, training=False):
        """x (..., in) -> y (..., out); ``training`` keeps x for ``backward``."""
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array, got dtype {arr.dtype}")
        if arr.ndim < 1 or arr.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {arr.shape}")
        x2 = np.ascontiguousarray(arr.reshape(-1, self.in_features), dtype=self.dtype)
        y = np.empty((x2.shape[0], self.out_features), self.dtype)
        matmul_batch(y, x2, self._params["weight"])
        if self.bias:
            y += self._params["bias"]
        self._saved = (x2, arr.shape) if training else None
        return y.reshape(arr.shape[:-1] + (self.out_features,))

    __call__ = forward

    def backward(self, dy):
        """Add dW, db into the gradients; return dx shaped like the forward's x."""
        x2, shape = self._saved_input()
        dy2 = weights.check_float_array(dy, "dy", shape[:-1] + (self.out_features,), self.dtype) \
            .reshape(-1, self.out_features)
        w = self._params["weight"]
        if self.bias:
            self._grads["bias"] += dy2.sum(axis=0)
        if w.format == "dense":
            cpu_kernels.dense_grad_acc(self._grads["weight"], np.empty_like(self._grads["weight"]),
                             np.ascontiguousarray(dy2), x2)
        else:
            sddmm_acc(self._grads["weight"], np.ascontiguousarray(dy2.T),
                       np.ascontiguousarray(x2.T), w)
        dx = np.empty_like(x2)
        matmul_batch(dx, dy2, w, transposed=True)
        return dx.reshape(shape)


class Embedding(_Module):
    """Rows of a (num_embeddings, embedding_dim) table looked up by index.

    The gradient is sparse in rows: ``backward`` adds only into the rows the
    forward looked up, listed in ``touched_rows`` (an optimizer may restrict
    its update to them; the dense ``grad_arrays()["weight"]`` is zero
    elsewhere).
    """

    def __init__(self, num_embeddings, embedding_dim, *, dtype=np.float32, seed=None):
        self.num_embeddings = check_int(num_embeddings, "num_embeddings", 1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        rng = np.random.default_rng(seed)  # N(0, 1), as torch.nn.Embedding
        self.load_state_dict({"weight": rng.standard_normal((self.num_embeddings,
                                                             self.embedding_dim))})

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype.name})"

    def load_state_dict(self, state):
        """Replace the table (copied); resets the gradient and ``touched_rows``.

        Parameters
        ----------
        state : dict
            ``{"weight": array (num_embeddings, embedding_dim)}``, finite values.

        Raises
        ------
        KeyError
            If ``state`` is not a dict with exactly the key ``"weight"``.
        TypeError, ValueError
            If the weight's dtype or shape is wrong, or it holds NaN or inf.
        """
        if not isinstance(state, dict) or set(state) != {"weight"}:
            raise KeyError(f"state must be a dict with the key 'weight', got {state!r:.60}")
        w = weights.check_float_array(state["weight"], "weight",
                                (self.num_embeddings, self.embedding_dim), self.dtype)
        if not np.all(np.isfinite(w)):
            raise ValueError("weight must be finite, got NaN or inf values")
        self._install({"weight": w.copy()})
        self.touched_rows = np.zeros(0, np.int64)

    def forward(self, indices, training=False):
        """indices (...) of ints in [0, num_embeddings) -> vectors (..., embedding_dim)."""
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_embeddings):
            raise ValueError(f"indices must lie in [0, {self.num_embeddings}), got values in "
                             f"[{idx.min()}, {idx.max()}]")
        self._saved = idx.copy() if training else None
        return self._params["weight"][idx]

    __call__ = forward

    def backward(self, dy):
        """Add dy into the looked-up rows (repeated indices add up); returns None."""
        idx = self._saved_input()
        dy = weights.check_float_array(dy, "dy", idx.shape + (self.embedding_dim,), self.dtype)
        np.add.at(self._grads["weight"], idx.reshape(-1), dy.reshape(-1, self.embedding_dim))
        self.touched_rows = np.union1d(self.touched_rows, idx.reshape(-1))

    def zero_grad(self):
        """Zero the gradient and empty ``touched_rows``."""
        super().zero_grad()
        self.touched_rows = np.zeros(0, np.int64)
