"""``numlstm demo``: train, prune and stream a character-level LSTM in under a minute.

The data set is real and always at hand offline: the source text of a few
Python standard-library modules (this interpreter's own ``.py`` files). The
last 10% of every file is held out for validation.

What it does, all in NumPy around the library's kernels:

1. trains a one-layer LSTM on one-hot characters, with a linear softmax head
   and Adam written inline below;
2. prunes every LSTM weight matrix to 90% sparsity by magnitude
   (``numlstm.prune.magnitude``: the survivors are stored as CSR);
3. fine-tunes briefly: the CSR weights train only their stored values (the
   ``.data`` arrays), the biases and the head train as before;
4. reports validation loss, weight bytes and the latency of one streaming step
   (batch 1), dense against CSR, and samples some text.

The kernels both models use are compiled first (``numlstm.compile``; from
the kernel cache after the first run), and that time is reported apart: the
``seconds`` budget is for training and timing alone. The dense model keeps
training while the pruned one fine-tunes, for the same number of steps, so
the table compares models that trained equally long.

Glossary: T time steps, B batch, V vocabulary (= I, the one-hot input width),
H hidden, N = T*B.
"""

import copy
import importlib
import inspect
import math
import time

import numpy as np
import scipy.sparse as sp

from numlstm import ahead, prune
from numlstm.lstm import LSTM

# Pure-Python modules that every CPython ships as source.
CORPUS_MODULES = ("argparse", "textwrap", "functools", "string", "shlex", "difflib",
                  "calendar", "fractions", "heapq", "contextlib", "pprint")
VALID_FRACTION = 0.1
VALID_STREAMS = 16  # the validation text is read as this many contiguous streams


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def load_corpus(modules=CORPUS_MODULES, valid_fraction=VALID_FRACTION):
    """Source text of stdlib modules, split per file into (train, valid) strings.

    Returns ``(train_text, valid_text, names)``; the last ``valid_fraction`` of
    each file goes to validation. Modules without a ``.py`` source file (a
    stripped installation) are skipped; RuntimeError if none is left.
    """
    train, valid, names = [], [], []
    for name in modules:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError):
            path = None
        if not path:
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cut = int(len(text) * (1 - valid_fraction))
        train.append(text[:cut])
        valid.append(text[cut:])
        names.append(name)
    if not names:
        raise RuntimeError(f"no source file found for any of the stdlib modules {modules}; "
                           "the demo needs an installation that ships .py sources")
    return "\n".join(train), "\n".join(valid), names


def encode(train_text, valid_text):
    """Characters -> int indices over the training alphabet.

    Returns ``(train (n,) int64, valid (m,) int64, alphabet str)``. Characters
    outside printable ASCII and newline become a space, as do validation
    characters that never occur in training.
    """
    def codes(text):
        c = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
        keep = ((c >= 32) & (c < 127)) | (c == 10)
        return np.where(keep, c, 32)

    tr, va = codes(train_text), codes(valid_text)
    alphabet = np.unique(tr)  # (V,) sorted byte values
    table = np.full(256, np.searchsorted(alphabet, 32), np.int64)  # unknown -> space
    table[alphabet] = np.arange(alphabet.size)
    return table[tr], table[va], alphabet.astype(np.uint8).tobytes().decode("ascii")


def random_batch(data, rng, T, B):
    """B random windows of T+1 characters -> (inputs (T, B), targets (T, B))."""
    starts = rng.integers(0, data.size - T - 1, B)
    win = data[starts[:, None] + np.arange(T + 1)].T  # (T+1, B)
    return win[:-1], win[1:]


def stream_split(data, streams):
    """The whole sequence as ``streams`` contiguous rows: (inputs (T, S), targets (T, S))."""
    T = (data.size - 1) // streams
    inp = data[:T * streams].reshape(streams, T).T
    tgt = data[1:T * streams + 1].reshape(streams, T).T
    return np.ascontiguousarray(inp), np.ascontiguousarray(tgt)


# ----------------------------------------------------------------------------
# Softmax head, loss, optimizer
# ----------------------------------------------------------------------------

class Head:
    """logits (N, V) = h (N, H) @ W^T + b, trained alongside the LSTM."""

    def __init__(self, hidden, vocab, rng, dtype=np.float32):
        k = 1 / math.sqrt(hidden)
        self.W = rng.uniform(-k, k, (vocab, hidden)).astype(dtype)  # (V, H)
        self.b = np.zeros(vocab, dtype)  # (V,)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)

    def loss(self, h, targets, grad=False):
        """Mean cross-entropy (nats) of ``targets`` (N,); with ``grad`` also dh (N, H).

        ``grad`` sets ``dW``, ``db`` (overwriting) and returns the gradient
        that flows into the LSTM output.
        """
        N = h.shape[0]
        logits = h @ self.W.T + self.b  # (N, V)
        logits -= logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        logp = logits - logz  # (N, V)
        rows = np.arange(N)
        loss = -float(logp[rows, targets].mean(dtype=np.float64))
        if not grad:
            return loss, None
        dlogits = np.exp(logp)
        dlogits[rows, targets] -= 1
        dlogits /= N
        np.matmul(dlogits.T, h, out=self.dW)
        np.sum(dlogits, axis=0, out=self.db)
        return loss, dlogits @ self.W  # (N, H)


class Adam:
    """Adam with global-norm gradient clipping, updating arrays in place.

    ``params`` and ``grads`` are matched lists of live arrays (for the LSTM,
    ``parameters()`` and ``grad_arrays()``: CSR weights contribute their
    ``.data``, so only stored values move).
    """

    def __init__(self, params, grads, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, clip=1.0):
        self.params, self.grads = params, grads
        self.lr, self.b1, self.b2, self.eps, self.clip = lr, betas[0], betas[1], eps, clip
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self):
        self.t += 1
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in self.grads))
        scale = min(1.0, self.clip / (norm + 1e-12))
        lr_t = self.lr * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for p, g, m, v in zip(self.params, self.grads, self.m, self.v, strict=True):
            gs = g * scale
            m *= self.b1
            m += (1 - self.b1) * gs
            v *= self.b2
            v += (1 - self.b2) * gs * gs
            p -= lr_t * m / (np.sqrt(v) + self.eps)
        return norm


# ----------------------------------------------------------------------------
# Training, evaluation, pruning, streaming
# ----------------------------------------------------------------------------

def _optimizer(model, head, lr):
    names = sorted(model.parameters())
    params, grads = model.parameters(), model.grad_arrays()
    return Adam([params[n] for n in names] + [head.W, head.b],
                [grads[n] for n in names] + [head.dW, head.db], lr=lr)


def train_step(model, head, opt, eye, data, rng, T, B):
    """One Adam step on a random batch; returns the training loss (nats/char)."""
    inp, tgt = random_batch(data, rng, T, B)
    x = eye[inp]  # (T, B, V) one-hot
    y, _ = model(x, training=True)  # (T, B, H)
    H = y.shape[2]
    loss, dh = head.loss(y.reshape(T * B, H), tgt.reshape(-1), grad=True)
    model.zero_grad()
    model.backward(dh.reshape(T, B, H))
    opt.step()
    return loss


def evaluate(model, head, eye, inp, tgt):
    """Mean validation cross-entropy in nats per character (one forward call)."""
    y, _ = model(eye[inp])
    T, S, H = y.shape
    return head.loss(y.reshape(T * S, H), tgt.reshape(-1))[0]


def stream_us_per_step(model, eye, codes, repeats=3):
    """Median µs per ``Stream.step`` at batch 1 over ``codes`` (one-hot inputs)."""
    xs = eye[codes][:, None, :]  # (T, 1, V), each xs[t] C-contiguous
    s = model.stream(batch_size=1)
    for t in range(min(50, len(xs))):  # warm-up (and compile)
        s.step(xs[t])
    times = []
    for _ in range(repeats):
        s.reset()
        t0 = time.perf_counter()
        for t in range(len(xs)):
            s.step(xs[t])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(xs) * 1e6


def sample(model, head, alphabet, prompt, n, rng, temperature=0.7):
    """Generate ``n`` characters after ``prompt`` with the streaming API."""
    V = len(alphabet)
    eye = np.eye(V, dtype=np.float32)
    lookup = {ch: i for i, ch in enumerate(alphabet)}
    s = model.stream(batch_size=1)
    h = None
    for ch in prompt:
        h = s.step(eye[lookup.get(ch, lookup[" "])][None, :])
    out = []
    for _ in range(n):
        logits = (h @ head.W.T + head.b)[0].astype(np.float64) / temperature
        p = np.exp(logits - logits.max())
        k = int(rng.choice(V, p=p / p.sum()))
        out.append(alphabet[k])
        h = s.step(eye[k][None, :])
    return prompt + "".join(out)


def _trainable_nnz(state):
    total = kept = 0
    for name, w in state.items():
        if name.startswith("weight"):
            total += w.shape[0] * w.shape[1]
            kept += w.nnz if sp.issparse(w) else int(np.count_nonzero(w))
    return kept, total


# ----------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------

def run_demo(seconds=45.0, *, steps=None, finetune_steps=None, hidden=128, seq_len=32,
             batch=16, lr=1e-2, finetune_lr=3e-3, sparsity=0.9, seed=0, bench_steps=1000,
             sample_chars=200, valid_chars=None, quiet=True, log=print):
    """Train, prune, fine-tune and stream a character LSTM; return the figures.

    Parameters
    ----------
    seconds : float
        Wall-clock budget for training and timing, after the kernels are
        compiled (``seconds_compile``, reported apart). The dense phase
        trains for about 45% of it; then the pruned copy fine-tunes and the
        dense model trains as many steps more (the dense control), together
        about 40%; the rest evaluates and times. Ignored for a phase whose
        step count is given.
    steps, finetune_steps : int, optional
        Exact step counts (deterministic runs, tests): the dense phase, and
        the fine-tuning (which the dense control matches). ``finetune_steps``
        defaults to a third of ``steps`` when ``steps`` is given.
    hidden, seq_len, batch : int
        H, the training window T and the batch B.
    lr, finetune_lr : float
        Adam learning rates of the two phases.
    sparsity : float
        Fraction of every LSTM weight matrix pruned away.
    seed : int
        Seeds initialisation, batches and sampling.
    bench_steps : int
        Streaming steps timed per repeat (3 repeats, median).
    sample_chars : int
        Characters generated at the end (0 for none).
    valid_chars : int, optional
        Use only the first ``valid_chars`` validation characters (faster).
    quiet : bool
        No progress lines.
    log : callable
        Where progress lines go.

    Returns
    -------
    dict
        Figures: ``loss_untrained``, ``loss_dense`` (the dense model after
        ``steps + finetune_steps`` steps), ``loss_pruned`` (pruned after
        ``steps``), ``loss_finetuned`` (then fine-tuned ``finetune_steps``)
        (validation nats/char; ``bits_*`` the same in bits),
        ``bytes_dense``, ``bytes_csr``, ``bytes_layout`` (what the CSR
        model's stream added), ``sparsity``, ``us_step_dense``,
        ``us_step_csr``, step counts, data sizes, ``sample``, and timings:
        ``seconds_compile``, ``seconds`` (the rest).
    """
    say = (lambda *a: None) if quiet else log
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must lie in (0, 1), got {sparsity}")
    if steps is not None and finetune_steps is None:
        finetune_steps = max(1, steps // 3)
    rng = np.random.default_rng(seed)

    train_text, valid_text, names = load_corpus()
    train, valid, alphabet = encode(train_text, valid_text)
    if valid_chars is not None:
        valid = valid[:valid_chars + 1]
    V = len(alphabet)
    eye = np.eye(V, dtype=np.float32)
    v_inp, v_tgt = stream_split(valid, min(VALID_STREAMS, max(1, (valid.size - 1) // 8)))
    say(f"data: {train.size:,} training and {valid.size:,} validation characters from the "
        f"stdlib sources of {', '.join(names)}; vocabulary {V}")

    model = LSTM(V, hidden, seed=seed)
    head = Head(hidden, V, rng)
    res = {"vocab": V, "train_chars": int(train.size), "valid_chars": int(valid.size),
           "modules": names, "hidden": hidden, "seq_len": seq_len, "batch": batch,
           "loss_uniform": math.log(V)}

    # -- 0. compile what both models will run (a cache load when warm) -----
    say("compiling the kernels of both models (once: the kernel cache keeps them) ...")
    t0 = time.perf_counter()
    pruned = copy.deepcopy(model)
    prune.magnitude(pruned, sparsity)
    for m in (model, pruned):
        ahead.compile(m, [batch], seq_lens=[seq_len], forward=False, training=True)
        ahead.compile(m, [v_inp.shape[1]], seq_lens=[v_inp.shape[0]], stream=False)
    res["seconds_compile"] = time.perf_counter() - t0
    say(f"kernels ready in {res['seconds_compile']:.1f} s")
    t_start = time.perf_counter()  # the budget starts here
    res["loss_untrained"] = evaluate(model, head, eye, v_inp, v_tgt)
    say(f"untrained: validation {res['loss_untrained']:.3f} nats/char (ln V = {math.log(V):.3f})")

    # -- 1. dense training -------------------------------------------------
    say(f"training dense LSTM({V} -> {hidden}) with T={seq_len}, B={batch}, Adam lr={lr} ...")
    opt = _optimizer(model, head, lr)
    deadline = t_start + 0.45 * seconds
    n, losses = 0, []
    while (n < steps) if steps is not None else (n < 5 or time.perf_counter() < deadline):
        losses.append(train_step(model, head, opt, eye, train, rng, seq_len, batch))
        n += 1
        if n % 50 == 0:
            say(f"  step {n:4d}  train {np.mean(losses[-50:]):.3f} nats/char  "
                f"({time.perf_counter() - t_start:.1f} s)")
    res["steps"] = n
    dense_step = (time.perf_counter() - t_start) / n  # seconds, for the dense control below
    say(f"dense: {n} steps")

    # -- 2. prune a copy ----------------------------------------------------
    pruned, pruned_head = copy.deepcopy(model), copy.deepcopy(head)
    prune.magnitude(pruned, sparsity)
    kept, total = _trainable_nnz(pruned.state_dict())
    res["sparsity"] = 1 - kept / total
    res["bytes_csr"] = pruned.weight_bytes()
    res["loss_pruned"] = evaluate(pruned, pruned_head, eye, v_inp, v_tgt)
    say(f"pruned a copy to {res['sparsity']:.1%} sparsity (CSR): validation "
        f"{res['loss_pruned']:.3f} nats/char")

    # -- 3. fine-tune the kept weights; the dense model trains as long -------
    # Fine-tuning and the dense control's as many steps share 40% of the budget.
    ft_opt, ft_losses = _optimizer(pruned, pruned_head, finetune_lr), []
    deadline = time.perf_counter() + 0.4 * seconds
    m = 0
    while (m < finetune_steps) if finetune_steps is not None \
            else (m < 5 or time.perf_counter() + (m + 1) * dense_step < deadline):
        ft_losses.append(train_step(pruned, pruned_head, ft_opt, eye, train, rng, seq_len,
                                    batch))
        m += 1
        if m % 50 == 0:
            say(f"  fine-tune step {m:4d}  train {np.mean(ft_losses[-50:]):.3f} nats/char  "
                f"({time.perf_counter() - t_start:.1f} s)")
    res["finetune_steps"] = m
    res["loss_finetuned"] = evaluate(pruned, pruned_head, eye, v_inp, v_tgt)
    kept_after, _ = _trainable_nnz(pruned.state_dict())
    res["pattern_kept"] = kept_after == kept
    say(f"fine-tuned: {m} steps, validation {res['loss_finetuned']:.3f} nats/char; "
        f"the dense model trains {m} steps more ...")
    for _ in range(m):
        train_step(model, head, opt, eye, train, rng, seq_len, batch)
    res["loss_dense"] = evaluate(model, head, eye, v_inp, v_tgt)
    res["bytes_dense"] = model.weight_bytes()
    say(f"dense: {n + m} steps, validation {res['loss_dense']:.3f} nats/char")

    # -- 4. streaming latency and a sample -----------------------------------
    res["us_step_dense"] = stream_us_per_step(model, eye, train[:bench_steps])
    res["us_step_csr"] = stream_us_per_step(pruned, eye, train[:bench_steps])
    res["bytes_layout"] = pruned.weight_bytes() - res["bytes_csr"]  # built by the stream
    for key in ("untrained", "dense", "pruned", "finetuned"):
        res[f"bits_{key}"] = res[f"loss_{key}"] / math.log(2)
    res["sample"] = (sample(pruned, pruned_head, alphabet, "def ", sample_chars, rng)
                     if sample_chars else "")
    res["seconds"] = time.perf_counter() - t_start
    return res


def format_report(res):
    """The demo's figures as a short plain-text table."""
    pct = f"{res['sparsity']:.0%}"
    rows = [("untrained", res["loss_untrained"], None, None),
            (f"dense ({res['steps'] + res['finetune_steps']} steps)", res["loss_dense"],
             res["bytes_dense"], res["us_step_dense"]),
            (f"{pct} CSR, pruned at {res['steps']}", res["loss_pruned"], res["bytes_csr"],
             res["us_step_csr"]),
            (f"{pct} CSR, + {res['finetune_steps']} fine-tuning", res["loss_finetuned"],
             res["bytes_csr"], res["us_step_csr"])]
    lines = [f"char-level LSTM, V={res['vocab']}, H={res['hidden']}; validation: "
             f"{res['valid_chars']:,} held-out characters of stdlib source",
             "",
             f"{'model':<30}{'nats/char':>10}{'bits/char':>10}{'weight bytes':>14}"
             f"{'µs/step (B=1)':>15}",
             "-" * 79]
    for label, loss, nbytes, us in rows:
        lines.append(f"{label:<30}{loss:>10.3f}{loss / math.log(2):>10.3f}"
                     f"{'-' if nbytes is None else f'{nbytes:,}':>14}"
                     f"{'-' if us is None else f'{us:.1f}':>15}")
    lines += ["-" * 79,
              f"CSR / dense: weight bytes x{res['bytes_csr'] / res['bytes_dense']:.3f}, "
              f"streaming step x{res['us_step_csr'] / res['us_step_dense']:.2f} (the CSR "
              f"stream runs on a per-step layout of +{res['bytes_layout']:,} bytes: "
              "numlstm.layouts)",
              f"training and timing {res['seconds']:.1f} s, after compiling the kernels in "
              f"{res['seconds_compile']:.1f} s (the kernel cache keeps them for the next run)"]
    if res.get("sample"):
        lines += ["", "sample (fine-tuned CSR model, temperature 0.7):", res["sample"]]
    return "\n".join(lines)
