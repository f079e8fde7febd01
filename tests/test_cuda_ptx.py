"""Every real CUDA kernel compiles to PTX and links to cubin without spilling.

No GPU or driver needed: ``numba.cuda.compile_ptx`` uses NVVM and NVRTC, and
nvJitLink (``cuda.bindings.nvjitlink``) assembles the PTX to cubin and reports
registers, stack and spills (all from ``pip install "numba-cuda[cu13]"``, the
``cuda`` extra). Skips under the simulator (it replaces the compiler) and when
the toolchain is missing. Run with ``-s`` to see the register/spill table.
"""

import re
import types

import numba
import pytest

if numba.config.ENABLE_CUDASIM:
    pytest.skip("PTX compilation needs the real CUDA target; unset NUMBA_ENABLE_CUDASIM",
                allow_module_level=True)

try:
    import numba.cuda.dispatcher as cuda_dispatcher
    from cuda.bindings import nvjitlink
    from numba import cuda

    @cuda.jit
    def _probe(a):
        a[0] = 1.0

    cuda.compile_ptx(_probe, (numba.float32[::1],), cc=(8, 0))
except Exception as exc:  # noqa: BLE001 - any missing piece of the toolchain
    pytest.skip(f"numba-cuda with NVVM/NVRTC/nvJitLink is not usable here ({exc!r}); "
                f'pip install "numlstm[cuda]"', allow_module_level=True)

from numlstm.kernels import cuda as C  # noqa: E402

CCS = [(8, 0), (9, 0)]
ROWS = []  # (cc, kernel, dtype, index dtype, registers, stack, spill stores, spill loads)


@pytest.fixture
def target_cc(monkeypatch, request):
    """Compile for ``cc`` with no device: numba-cuda compiles the device
    functions a kernel calls for ``get_current_device().compute_capability``
    (which opens a CUDA context); answer with the target instead."""
    cc = request.param
    monkeypatch.setattr(cuda_dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=cc))
    return cc


def link(ptx, cc):
    """(cubin size, info log) of ``ptx`` assembled by nvJitLink for sm_<cc>."""
    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        return nvjitlink.get_linked_cubin_size(handle), log.decode()
    finally:
        nvjitlink.destroy(handle)


def resources(log):
    """registers, stack bytes, spill store bytes, spill load bytes from ptxas' log."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    assert regs and frame, log
    return (int(regs.group(1)),) + tuple(int(v) for v in frame.groups())


@pytest.mark.parametrize("target_cc", CCS, indirect=True, ids=["sm80", "sm90"])
@pytest.mark.parametrize("entry", C.KERNELS, ids=[f"{n}-{d}-{i}" for n, d, i, _, _ in C.KERNELS])
def test_kernel_compiles_links_and_does_not_spill(entry, target_cc):
    name, dtype, index, kernel, sig = entry
    ptx, restype = cuda.compile_ptx(kernel, sig, cc=target_cc)
    assert restype == numba.types.void
    assert f".target sm_{target_cc[0]}{target_cc[1]}" in ptx
    size, log = link(ptx, target_cc)
    assert size > 0
    regs, stack, spill_st, spill_ld = resources(log)
    ROWS.append((target_cc, name, dtype.name, index.name, regs, stack, spill_st, spill_ld))
    if name in C.HOT:
        assert spill_st == 0 and spill_ld == 0, f"{name} spills: {log}"
    if name == "_persistent_forward_kernel":
        # The hand-written grid barrier is in the code: an atomic on global
        # memory and a device-wide fence (membar.gl / fence.sc.gpu).
        assert "atom.global.add" in ptx or "red.global.add" in ptx
        assert "membar.gl" in ptx or "fence.sc.gpu" in ptx or "fence.acq_rel.gpu" in ptx


def test_print_register_table():
    """The table of the kernels compiled above (shown with ``-s``)."""
    if not ROWS:
        pytest.skip("no kernel compiled in this run")
    print("\ncc   kernel                       dtype   index  regs stack spill_st spill_ld")
    for cc, name, dtype, index, regs, stack, st, ld in ROWS:
        print(f"{cc[0]}.{cc[1]}  {name:28s} {dtype:7s} {index:6s} {regs:4d} {stack:5d} "
              f"{st:8d} {ld:8d}")
