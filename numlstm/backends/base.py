"""What both backends' parameter stores share: finding a layer's arguments."""


class ParamLookups:
    """Name lookups over a store's ``weights`` (name -> weight with
    ``kernel_args()`` / ``kernel_args_t()`` / ``step_args()``), ``params``
    (name -> weight or bias array), ``no_bias``, ``no_proj``, ``has_bias``
    and ``proj_size``: the CPU and CUDA ``Params`` set these, and the engine
    and streams read a layer's arguments only through these methods."""

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
