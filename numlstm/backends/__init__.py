"""Backends: what the one orchestration (``numlstm.engine``) runs on.

A backend is a module with the same names (docs/design.md, CPU/GPU twins):
``Workspace`` and ``IndexWorkspace`` (buffers), ``load_params`` (the model's
parameters as the kernels of that device read them), the array operations
the engine needs (``empty``, ``copy``, ``fill``, ``add``, ``mul``,
``take_cols``, ``put_cols``, ``scatter_cols``, ``add_rows_at``, ``gather_rows``,
``transpose_pair``, ``matmul_batch``, ``dense_grad_acc``, ``sddmm_acc``,
``bias_grad_acc``, ``seq_forward``, ``seq_backward``, ``step_plan``), and the
boundary: ``check_x``, ``place_x``, ``read_state``, ``read_dy``,
``host_lengths``, ``indices``, ``new_output``, ``finish_output``, ``to_host``.

``cpu`` is imported with the package; ``cuda`` imports numba.cuda, so it is
imported only by ``get("cuda")`` (``LSTM.to("cuda")``).
"""

NAMES = ("cpu", "cuda")


def get(name):
    """The backend module called ``name`` ("cpu" or "cuda")."""
    if name not in NAMES:
        raise ValueError(f"device must be one of {NAMES}, got {name!r}")
    if name == "cpu":
        from numlstm.backends import cpu

        return cpu
    from numlstm._optional import require

    require("numba.cuda", "cuda", 'device="cuda" (LSTM.to("cuda"))', package="numba-cuda")
    from numlstm.backends import cuda

    cuda.load()
    return cuda
