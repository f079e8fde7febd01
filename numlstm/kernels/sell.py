"""Conversions between CSR order and the SELL-C-sigma layout (``numlstm.layouts``).

Host-side only: they build and refresh the per-step execution layout of a CSR
weight on the CPU, so unlike ``cpu.py``'s kernels they have no CUDA twins
(device weights keep plain CSR).
"""

from numba import njit

from numlstm.kernels.cpu import _OPTS


@njit(**_OPTS)
def sell_copy(sell, flat, indptr, slices, to_sell):
    """Copy between CSR order, flat (nnz,), and a SELL-C-sigma layout, sell (S, C).

    Row r in lane l of slice s (``slices[s, 2 + l] == r``) keeps its j-th
    value at ``sell[slices[s, 0] + j, l]``; ``to_sell`` says the direction.
    Padding entries are not touched (zeros when the layout is new).
    """
    C = sell.shape[1]
    for s in range(slices.shape[0]):
        e0 = slices[s, 0]
        for lane in range(C):
            r = slices[s, 2 + lane]
            if r >= 0:
                k0 = indptr[r]
                for j in range(indptr[r + 1] - k0):
                    if to_sell:
                        sell[e0 + j, lane] = flat[k0 + j]
                    else:
                        flat[k0 + j] = sell[e0 + j, lane]


@njit(**_OPTS)
def window_copy(sell, flat, indptr, indices, table, pad, to_sell):
    """Copy between CSR order, flat (nnz,), and a windowed SELL layout, sell (E, C).

    Row r in lane l of slice s walks its slice's entries window by window;
    the entries whose local column ``indices[e, l]`` is below ``pad`` are its
    stored values in CSR order (the layout keeps a row's values by column).
    """
    C = sell.shape[1]
    nwin = table.shape[1] - 1 - C
    for s in range(table.shape[0]):
        for lane in range(C):
            r = table[s, nwin + 1 + lane]
            if r < 0:
                continue
            k = indptr[r]
            for e in range(table[s, 0], table[s, nwin]):
                if indices[e, lane] < pad:
                    if to_sell:
                        sell[e, lane] = flat[k]
                    else:
                        flat[k] = sell[e, lane]
                    k += 1


@njit(**_OPTS)
def window_columns(out, indptr, indices, table, window, pad):
    """Global column indices out (nnz,) in CSR order from a windowed layout."""
    C = indices.shape[1]
    nwin = table.shape[1] - 1 - C
    for s in range(table.shape[0]):
        for lane in range(C):
            r = table[s, nwin + 1 + lane]
            if r < 0:
                continue
            k = indptr[r]
            for w in range(nwin):
                for e in range(table[s, w], table[s, w + 1]):
                    if indices[e, lane] < pad:
                        out[k] = w * window + indices[e, lane]
                        k += 1
