"""numlstm: a memory-lean, framework-free LSTM on Numba kernels.

Dense and CSR weights, PyTorch's semantics and parameter names, training by
BPTT, and allocation-free streaming inference.
"""

from numlstm.lstm import LSTM
from numlstm.stream import Stream

__all__ = ["LSTM", "Stream"]
__version__ = "0.1.0"
