"""What the suite measures: cases, sizes, storage kinds, peers and targets.

Glossary as in the package: T time steps, B batch, I input features, H hidden,
G = 4H gate rows. Every figure is float32.
"""

import os

CASES = {
    "a": "streaming inference: batch 1, one step per call, state carried",
    "b": "whole-sequence inference",
    "c": "training step: forward + backward",
    "d": "training memory: peak resident memory increase",
    "e": "weight bytes per storage kind",
    "f": "cold start: fresh process to first output",
    "g": "scaling: time per streaming step as H and as sparsity grow",
}

FULL = {
    "limits": {"n": 2048, "mib": 256, "repeats": 5},
    "a": {"I": 64, "H": 256, "T": 1000, "repeats": 7, "warmup": 2},
    "b": {"I": 64, "H": 256, "T": 1000, "B": [1, 16], "repeats": 7, "warmup": 2},
    "c": {"I": 128, "H": 512, "T": 100, "B": 32, "repeats": 7, "warmup": 2,
          "reference_repeats": 2},
    "d": {"T": [100, 1000, 10000], "repeats": 2, "repeats_at_max_T": 1},
    "e": {"I": 64, "H": 256},
    "f": {"I": 64, "H": 256, "warm_repeats": 5, "cold_repeats": 3,
          "cold_kinds": ["dense", "csr90"]},
    "g": {"I": 64, "H": [128, 256, 512, 1024, 2048], "sparsity_H": 1024,
          "sparsity": [0.0, 0.5, 0.8, 0.9, 0.95, 0.98], "T": 200, "repeats": 5, "warmup": 1},
}
QUICK = {
    "limits": {"n": 512, "mib": 32, "repeats": 2},
    "a": {"I": 64, "H": 256, "T": 50, "repeats": 3, "warmup": 1},
    "b": {"I": 64, "H": 256, "T": 50, "B": [1, 16], "repeats": 3, "warmup": 1},
    "c": {"I": 32, "H": 64, "T": 10, "B": 4, "repeats": 2, "warmup": 1,
          "reference_repeats": 1},
    "d": {"T": [50, 200], "repeats": 1, "repeats_at_max_T": 1},
    "e": {"I": 64, "H": 256},
    "f": {"I": 64, "H": 256, "warm_repeats": 1, "cold_repeats": 1, "cold_kinds": ["dense"]},
    "g": {"I": 16, "H": [32, 64, 128], "sparsity_H": 128,
          "sparsity": [0.0, 0.5, 0.8, 0.9, 0.95, 0.98], "T": 20, "repeats": 2, "warmup": 1},
}

# numlstm storage kinds, all made through the public API from the same dense
# weights: (pruning, sparsity, quantize values, quantize indices).
VARIANTS = {
    "dense": (None, 0.0, None, None),
    "dense-f16": (None, 0.0, "float16", "auto"),
    "csr50": ("magnitude", 0.5, None, None),
    "csr90": ("magnitude", 0.9, None, None),
    "csr95": ("magnitude", 0.95, None, None),
    "bsr90": ("blocks", 0.9, None, None),
    "csr90-u16": ("magnitude", 0.9, "keep", "uint16"),
    "csr90-f16": ("magnitude", 0.9, "float16", "uint16"),
    "csr90-i8": ("magnitude", 0.9, "int8", "uint16"),
}
BLOCK = (8, 1)
TRAINABLE = ("dense", "csr50", "csr90", "csr95", "bsr90", "csr90-u16")
LABELS = {
    "dense": "numlstm dense",
    "dense-f16": "numlstm dense, float16 values",
    "csr50": "numlstm 50% CSR",
    "csr90": "numlstm 90% CSR",
    "csr95": "numlstm 95% CSR",
    "bsr90": "numlstm 90% BSR 8x1",
    "csr90-u16": "numlstm 90% CSR, uint16 indices (compact)",
    "csr90-f16": "numlstm 90% CSR, float16 values",
    "csr90-i8": "numlstm 90% CSR, int8 values",
    "csr-f32": "numlstm 90% CSR (float32)",
    "torch-cell": "torch `nn.LSTMCell` loop",
    "torch-lstm": "torch `nn.LSTM`",
    "ort": "ONNX Runtime (exported from torch)",
    "numpy": "NumPy float32 loop",
    "reference": "NumPy reference (float64, tests/reference.py)",
    "scipy-csr50": "scipy 50% CSR loop",
    "scipy-csr90": "scipy 90% CSR loop",
    "scipy-csr95": "scipy 95% CSR loop",
    "scipy-bsr90": "scipy 90% BSR 8x1 loop",
}
# The scipy loop that runs each sparse kind's pattern (its timing peer; its
# outputs are computed on each kind's own effective weights).
SCIPY_PEER = {"csr50": "scipy-csr50", "csr90": "scipy-csr90", "csr95": "scipy-csr95",
              "bsr90": "scipy-bsr90", "csr90-u16": "scipy-csr90", "csr90-f16": "scipy-csr90",
              "csr90-i8": "scipy-csr90"}
# The "csr-f32" column: each compact 90% CSR kind against float32 CSR (int32
# indices) of the same pattern.
F32_PEER = {"csr90-u16": "csr90", "csr90-f16": "csr90", "csr90-i8": "csr90"}
SCIPY_VARIANTS = {p: [v for v, q in SCIPY_PEER.items() if q == p] for p in set(SCIPY_PEER.values())}

# Peers per timing case, in the report's column order (scipy: each kind's own;
# "dense": numlstm's own dense kind, the baseline sparse kinds must beat).
PEERS = {
    "a": ["dense", "csr-f32", "torch-cell", "torch-lstm", "ort", "numpy", "scipy"],
    "b": ["dense", "csr-f32", "torch-lstm", "ort", "numpy", "scipy"],  # no LSTMCell sequence
    "c": ["dense", "torch-lstm", "reference"],
}

# The targets of issue 12 ("Sparse that pays"): (case, table, numlstm system,
# peer, minimum speedup), speedup = peer median / numlstm median (> 1:
# numlstm faster). Case a at H=1024 is case g's sparsity table.
TARGETS = [
    ("a", "stream", "csr90", "dense", 3.0),
    ("a", "stream", "csr95", "dense", 5.0),
    ("a", "stream", "bsr90", "dense", 5.0),
    ("a", "stream", "csr50", "dense", 0.9),
    ("a", "stream", "dense", "torch-cell", 5.0),
    ("a", "stream", "dense", "ort", 1.2),
    ("b", "B=1", "dense", "torch-lstm", 1.0),
    ("b", "B=1", "csr90", "torch-lstm", 2.0),
    ("b", "B=1", "bsr90", "torch-lstm", 4.0),
    ("b", "B=16", "dense", "torch-lstm", 1.0),
    ("a", "stream", "csr90-f16", "csr-f32", 1.0),
    ("a", "stream", "csr90-i8", "csr-f32", 1.0),
    ("b", "B=16", "csr90-u16", "csr-f32", 1.0),
    ("b", "B=16", "csr90-f16", "csr-f32", 1.0),
    ("b", "B=16", "csr90-i8", "csr-f32", 1.0),
    ("c", "train", "dense", "torch-lstm", 1.0),
    ("c", "train", "csr90", "torch-lstm", 2.5),
]
COLD_START_TARGET_S = 1.0  # f: warm kernel cache, fresh process to first output

# The issue's nominal limits of these 2-core machines; the suite measures its own.
NOMINAL_GEMM_GFLOPS = 155.0
NOMINAL_BANDWIDTH_GBS = 28.0
# torch.set_num_threads and ONNX Runtime's intra-op threads. A quick run (a
# smoke test, workers two at a time) sets NUMLSTM_SUITE_THREADS=1 and one BLAS
# thread in its workers: spinning thread pools on shared cores slow it 50-fold.
THREADS = int(os.environ.get("NUMLSTM_SUITE_THREADS", "2"))
TORCH_THREADS = ORT_THREADS = THREADS
QUICK_ENV = {"NUMLSTM_SUITE_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"}
SEED = 0
