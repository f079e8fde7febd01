"""numlstm: a memory-lean, framework-free LSTM on Numba kernels.

Dense, CSR and block-sparse weights (pruned, compact or quantized), PyTorch's
semantics and parameter names, training by BPTT (full tape, checkpointed or
truncated), and allocation-free streaming inference.
"""

from numlstm import layers, losses, optim, prune, quantize
from numlstm.ahead import compile  # noqa: F401 (numlstm.compile; not in __all__, below)
from numlstm.io import ModelFileError, load, save
from numlstm.lstm import LSTM
from numlstm.memory import memory_report
from numlstm.pool import StreamPool
from numlstm.stream import Stream
from numlstm.tbptt import truncated_bptt
from numlstm.train import fit

# numlstm.compile is left out of __all__: a star import would shadow the builtin.
__all__ = ["LSTM", "ModelFileError", "Stream", "fit", "layers", "load", "losses",
           "memory_report", "optim", "prune", "quantize", "save", "StreamPool", "truncated_bptt"]
__version__ = "0.1.0"
