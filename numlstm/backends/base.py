"""What both backends' parameter stores share: finding a layer's arguments."""


class ParamLookups:
    """Name lookups over a store's ``weights`` (name -> weight with
    ``kernel_args()`` / ``kernel_args_t()`` / ``step_args()``), ``params``
    (name -> weight, bias or peephole array), ``grads``, ``no_bias``,
    ``no_proj``, ``no_peep``, ``has_bias``, ``proj_size``, ``cell`` (a
    ``numlstm.cell.Cell``) and ``_cells`` (an empty dict): the CPU and CUDA
    ``Params`` set these, and the engine and streams read a layer's
    arguments only through these methods."""

    def cell_args(self, layer, d):
        """The kernels' ``cell`` argument of a layer and direction (kernels/cpu.py,
        "The cell options"): () for PyTorch's cell, else the variant's arrays,
        its peepholes and their gradient buffer bound (made once)."""
        args = self._cells.get((layer, d))
        if args is None:
            name = f"peephole_l{layer}{'_reverse' if d else ''}"
            peep, dpeep = ((self.params[name], self.grads[name]) if name in self.params
                           else (self.no_peep, self.no_peep))
            args = self.cell.kernel_cell(peep, dpeep, self.no_bias.dtype)
            if args:
                args = (self.to_backend(args[0]), self.to_backend(args[1])) + args[2:]
            self._cells[(layer, d)] = args
        return args

    def weight(self, kind, layer, d):
        """The weight W_ih / W_hh / W_hr (``kind`` "ih", "hh", "hr") of a layer
        and direction."""
        return self.weights[f"weight_{kind}_l{layer}{'_reverse' if d else ''}"]

    def biases(self, layer, d):
        """(bias_ih, bias_hh) (G,) of a layer and direction; zeros without bias."""
        if not self.has_bias:
            return self.no_bias, self.no_bias
        sfx = "_reverse" if d else ""
        return self.params[f"bias_ih_l{layer}{sfx}"], self.params[f"bias_hh_l{layer}{sfx}"]

    def proj_args(self, layer, d, transposed=False):
        """W_hr's four kernel arguments (of W_hr^T if ``transposed``); empty at P = 0."""
        if not self.proj_size:
            return self.no_proj
        w = self.weight("hr", layer, d)
        return w.kernel_args_t() if transposed else w.kernel_args()

    def step_args(self, kind, layer, d, B):
        """Kernel arguments of weight ``kind`` for per-step products of B rows
        (the weight's ``step_args()`` below ``config.STEP_MAX_B`` rows where
        the backend has execution layouts). No projection: the empty
        projection arguments."""
        if kind == "hr" and not self.proj_size:
            return self.no_proj
        return self._step_args(self.weight(kind, layer, d), B)

    def two_threads(self, layer, d, T, B):
        """Whether the forward recurrence of a layer and direction over T
        steps of B rows runs on two threads by hidden-unit halves (the CPU
        backend's choice; never on the GPU)."""
        return False

    def recurrent_args(self, layer, d, B):
        """W_hh's and W_hr's arguments for a recurrence over B rows."""
        return self.step_args("hh", layer, d, B) + self.step_args("hr", layer, d, B)

    def parameters(self):
        """name -> the live array kernels read: dense weights, sparse values, biases."""
        return {name: (p.values if name in self.weights else p)
                for name, p in self.params.items()}

    def grad_arrays(self):
        """name -> the live gradient array, shaped like ``parameters()``'s."""
        return dict(self.grads)

    def transposed_nbytes(self):
        """Bytes of the W^T patterns the sparse weights build for backward."""
        return sum(w.transposed_nbytes() for w in self.weights.values())
