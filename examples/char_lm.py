"""A character-level language model on Python's own source, pruned gradually to 90%.

Data: the source of eleven standard-library modules (``numlstm.demo``'s
corpus: always available offline); the last 10% of each file is held out.
Model: Embedding(V, 32) -> LSTM(32, H) -> Linear(H, V), trained with Adam
through ``numlstm.fit``. Phase 1 trains dense; phase 2 continues training
while ``GradualPruner`` (Zhu & Gupta's cubic schedule, a hook of ``fit``)
takes the LSTM to 90% sparsity, the optimizer's moments following each new
pattern (``on_prune=optimizer.remap``); finally the pruned LSTM is stored
as int8 values with uint16 indices.

Reported per model: held-out bits per character, the LSTM's weight bytes,
and the latency of one streaming step at batch 1.

    python examples/char_lm.py            # about 3 minutes on 2 cores
    python examples/char_lm.py --quick    # a smoke run
"""

import argparse
import math
import time

import numpy as np

import numlstm
from numlstm import demo, losses, optim
from numlstm.layers import Embedding, Linear


class CharLM:
    """Embedding -> LSTM -> Linear, with a training step and an evaluation."""

    def __init__(self, vocab, hidden, seed):
        self.embed = Embedding(vocab, 32, seed=seed)
        self.lstm = numlstm.LSTM(32, hidden, seed=seed)
        self.head = Linear(hidden, vocab, seed=seed)
        self.modules = [self.embed, self.lstm, self.head]

    def step(self, batch):
        inp, tgt = batch  # (T, B) ints
        y, _ = self.lstm(self.embed(inp, training=True), training=True)
        loss, dlogits = losses.softmax_cross_entropy(self.head(y, training=True), tgt)
        self.embed.backward(self.lstm.backward(self.head.backward(dlogits))[0])
        return loss

    def bits_per_char(self, inp, tgt):
        y, _ = self.lstm(self.embed(inp))
        return losses.softmax_cross_entropy(self.head(y), tgt)[0] / math.log(2)

    def stream_us(self, codes):
        """µs per step of embedding + LSTM stream + head at batch 1."""
        s = self.lstm.stream(1)
        table = self.embed.parameters()["weight"]
        h = np.zeros((1, self.lstm.output_size), self.lstm.dtype)  # each step's output
        for c in codes[:50]:  # warm-up
            s.step(table[c][None], out=h)
        t0 = time.perf_counter()
        for c in codes:
            self.head(s.step(table[c][None], out=h))
        return (time.perf_counter() - t0) / len(codes) * 1e6


def run(hidden=128, dense_steps=800, prune_steps=800, sparsity=0.9, seq_len=32, batch=16,
        valid_chars=20_000, seed=0, log=print):
    rng = np.random.default_rng(seed)
    train_text, valid_text, _ = demo.load_corpus()
    train, valid, alphabet = demo.encode(train_text, valid_text)
    v_inp, v_tgt = demo.stream_split(valid[:valid_chars + 1], 16)
    lm = CharLM(len(alphabet), hidden, seed)
    opt = optim.Adam(lm.modules, lr=optim.cosine_schedule(5e-3, dense_steps + prune_steps,
                                                            warmup_steps=min(50, dense_steps)))

    def batches(n):
        return lambda: [demo.random_batch(train, rng, seq_len, batch) for _ in range(n)]

    rows = []

    def record(label):
        rows.append((label, lm.bits_per_char(v_inp, v_tgt), lm.lstm.weight_bytes(),
                     lm.stream_us(train[:500])))
        log(f"{label}: {rows[-1][1]:.3f} bits/char")

    numlstm.fit(lm.step, opt, batches(dense_steps), clip=1.0, progress=False)
    record(f"dense ({dense_steps} steps)")
    pruner = numlstm.prune.GradualPruner(lm.lstm, sparsity, num_updates=10,
                                         frequency=max(1, prune_steps // 15),
                                         on_prune=lambda pos: opt.remap(pos, lm.lstm))
    numlstm.fit(lm.step, opt, batches(prune_steps), clip=1.0, progress=False,
                hooks=[lambda step, loss: pruner.step()])
    record(f"{lm.lstm.sparsity()['overall']:.0%} CSR (gradual, +{prune_steps} steps)")
    numlstm.quantize.quantize(lm.lstm, "int8")
    record("  ... int8 values, uint16 indices")
    return rows


def format_rows(rows):
    lines = [f"{'model':<40}{'bits/char':>10}{'LSTM bytes':>12}{'µs/step':>9}", "-" * 71]
    lines += [f"{label:<40}{bits:>10.3f}{nbytes:>12,}{us:>9.1f}" for label, bits, nbytes, us
              in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=800, help="steps per phase")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        rows = run(hidden=8, dense_steps=4, prune_steps=16, seq_len=8, batch=4, valid_chars=300)
    else:
        rows = run(hidden=args.hidden, dense_steps=args.steps, prune_steps=args.steps)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
