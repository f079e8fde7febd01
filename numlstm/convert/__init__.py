"""Converters between numlstm.LSTM and other frameworks' LSTMs.

Each framework is an optional extra, imported lazily inside the functions
that need it: ``import numlstm.convert`` never imports torch, keras or onnx.
Layouts other than PyTorch's (Keras' (I, 4U) kernels, ONNX's i, o, f, c gate
order) are converted here, at the boundary; the model always holds PyTorch's
names, shapes and gate order i, f, g, o.

- ``from_torch`` / ``to_torch``: torch.nn.LSTM, torch.nn.LSTMCell or a state dict.
- ``from_keras``: a Keras LSTM (or Bidirectional(LSTM)) layer, or its weights list.
- ``from_onnx`` / ``to_onnx``: standard ONNX ``LSTM`` nodes (ONNX Runtime runs
  what ``to_onnx`` writes).
"""

from numlstm.convert.keras import from_keras
from numlstm.convert.onnx import from_onnx, to_onnx
from numlstm.convert.torch import from_torch, to_torch

__all__ = ["from_keras", "from_onnx", "from_torch", "to_onnx", "to_torch"]
