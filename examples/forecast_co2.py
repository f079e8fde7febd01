"""Forecast next week's CO2 at Mauna Loa with an LSTM, then prune it.

Data: 2,284 weekly means (1958-2001, public domain; examples/data/README.md).
The series is modelled as its week-to-week differences, scaled to unit
variance; missing weeks are interpolated. The first 80% of the weeks train,
the last 20% test. The LSTM (1 -> H) reads the past 52 weeks' differences
and a linear head predicts the next one; the forecast is last value +
predicted difference.

Reported: test RMSE in ppm against two baselines (persistence: next week =
this week; seasonal: next week's change = the change one year earlier), for
the dense model, the same model pruned gradually to 80% sparsity while
fine-tuning, and that model stored as int8 values with uint16 indices,
with the LSTM's weight bytes.

    python examples/forecast_co2.py            # about a minute on 2 cores
    python examples/forecast_co2.py --quick    # a smoke run
"""

import argparse
import os

import numpy as np

import numlstm
from numlstm import losses, optim
from numlstm.layers import Linear

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                    "co2_mauna_loa_weekly.csv")
WINDOW = 52  # weeks of history per prediction


def load_series(path=DATA):
    """Weekly CO2 (ppm) as float64 (n,), gaps linearly interpolated."""
    values = []
    with open(path, encoding="ascii") as f:
        next(f)  # header: date,co2
        for line in f:
            _, value = line.strip().split(",")
            values.append(float(value) if value else np.nan)
    y = np.array(values)
    missing = np.isnan(y)
    y[missing] = np.interp(np.flatnonzero(missing), np.flatnonzero(~missing), y[~missing])
    return y


def windows(diff, start, stop):
    """Inputs (WINDOW, N, 1) of differences before each target t in [start, stop),
    and the targets (N, 1)."""
    idx = np.arange(start, stop)
    x = np.stack([diff[t - WINDOW:t] for t in idx], axis=1)[:, :, None]
    return x.astype(np.float32), diff[idx][:, None].astype(np.float32)


def train(model, head, x, y, epochs, lr, seed, pruner=None):
    rng = np.random.default_rng(seed)
    opt = optim.Adam([model, head], lr=lr)
    hooks = []
    if pruner is not None:
        pruner.on_prune = opt.remap
        hooks.append(lambda step, loss: pruner.step())

    def batches():
        order = rng.permutation(x.shape[1])
        return [order[k:k + 64] for k in range(0, order.size, 64)]

    def step(batch):
        out, _ = model(x[:, batch], training=True)
        pred = head(out[-1], training=True)
        loss, dpred = losses.mse(pred, y[batch])
        dout = np.zeros_like(out)
        dout[-1] = head.backward(dpred)
        model.backward(dout)
        return loss

    return numlstm.fit(step, opt, batches, epochs=epochs, clip=1.0, hooks=hooks,
                       progress=False)


def predict(model, head, x):
    out, _ = model(x)
    return head(out[-1])


def run(hidden=32, epochs=30, finetune_epochs=10, sparsity=0.8, seed=0, log=print):
    """Train, prune, fine-tune; return the result rows."""
    co2 = load_series()
    diff = np.diff(co2)  # diff[t] = co2[t+1] - co2[t]
    split = int(0.8 * diff.size)
    scale = diff[:split].std()
    z = diff / scale
    x_tr, y_tr = windows(z, WINDOW, split)
    x_te, y_te = windows(z, split, diff.size)
    true_next = co2[split + 1:]  # the value each test prediction targets
    last = co2[split:-1]

    def rmse(pred_diff):
        return float(np.sqrt(np.mean((last + pred_diff - true_next) ** 2)))

    rows = [("persistence (no change)", rmse(np.zeros_like(last)), None),
            ("seasonal (change a year ago)", rmse(diff[split - 52:diff.size - 52]), None)]
    model = numlstm.LSTM(1, hidden, seed=seed)
    head = Linear(hidden, 1, seed=seed)
    hist = train(model, head, x_tr, y_tr, epochs, 1e-2, seed)
    log(f"dense: {epochs} epochs, last training loss {hist['train_loss'][-1]:.3f}")
    rows.append((f"LSTM H={hidden}, dense",
                 rmse(predict(model, head, x_te)[:, 0].astype(np.float64) * scale),
                 model.weight_bytes()))
    steps_per_epoch = -(-x_tr.shape[1] // 64)
    pruner = numlstm.prune.GradualPruner(model, sparsity, num_updates=4,
                                         frequency=max(1, steps_per_epoch * finetune_epochs // 8))
    train(model, head, x_tr, y_tr, finetune_epochs, 3e-3, seed + 1, pruner)
    rows.append((f"LSTM H={hidden}, {model.sparsity()['overall']:.0%} CSR, fine-tuned",
                 rmse(predict(model, head, x_te)[:, 0].astype(np.float64) * scale),
                 model.weight_bytes()))
    numlstm.quantize.quantize(model, "int8")
    rows.append(("  ... stored int8/uint16 (inference)",
                 rmse(predict(model, head, x_te)[:, 0].astype(np.float64) * scale),
                 model.weight_bytes()))
    return rows, len(true_next)


def format_rows(rows, n_test):
    lines = [f"Mauna Loa weekly CO2, next-week forecast; test: last {n_test} weeks",
             "", f"{'model':<40}{'RMSE (ppm)':>11}{'weight bytes':>14}", "-" * 65]
    for label, err, nbytes in rows:
        lines.append(f"{label:<40}{err:>11.3f}{'-' if nbytes is None else f'{nbytes:,}':>14}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        rows, n = run(hidden=4, epochs=1, finetune_epochs=1)
    else:
        rows, n = run(hidden=args.hidden, epochs=args.epochs)
    print(format_rows(rows, n))
    return rows


if __name__ == "__main__":
    main()
