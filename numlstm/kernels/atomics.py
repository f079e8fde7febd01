"""Atomic operations on int64 array elements, for threads sharing a step.

Numba has no CPU atomics, and a plain load in a loop may be hoisted out of
it by LLVM, so a thread waiting on another would never see its store. These
intrinsics emit LLVM's atomic instructions (sequentially consistent, the
simplest order to reason about; on x86 a load is a plain ``mov`` and a
read-modify-write a ``lock``-prefixed instruction either way) on element
``i`` of a C-contiguous int64 array, and ``pause`` the spin-wait hint.
Used by ``numlstm.kernels.pair`` (docs/design.md, Two cores at batch 1).
"""

from llvmlite import ir
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

_ORDER = "seq_cst"


def _int64_array(a):
    return isinstance(a, nbtypes.Array) and a.dtype == nbtypes.int64 and a.layout == "C"


def _slot(context, builder, sig, args):
    """The address of element ``i`` of the array ``args[0]``."""
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]],
                                    wraparound=False)


@intrinsic
def load(typingctx, a, i):
    """a[i], read atomically."""
    if _int64_array(a) and isinstance(i, nbtypes.Integer):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(_slot(context, builder, sig, args), _ORDER, 8)
        return nbtypes.int64(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a[i] = v, written atomically."""
    if _int64_array(a) and isinstance(i, nbtypes.Integer) and isinstance(v, nbtypes.Integer):
        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[2], sig.args[2], nbtypes.int64)
            builder.store_atomic(val, _slot(context, builder, sig, args), _ORDER, 8)
            return context.get_dummy_value()
        return nbtypes.none(a, i, v), codegen


@intrinsic
def cas(typingctx, a, i, expected, new):
    """If a[i] == expected, set it to new, atomically; True when it did."""
    ints = all(isinstance(t, nbtypes.Integer) for t in (i, expected, new))
    if _int64_array(a) and ints:
        def codegen(context, builder, sig, args):
            old = context.cast(builder, args[2], sig.args[2], nbtypes.int64)
            val = context.cast(builder, args[3], sig.args[3], nbtypes.int64)
            pair = builder.cmpxchg(_slot(context, builder, sig, args), old, val, _ORDER,
                                   _ORDER)
            return builder.extract_value(pair, 1)
        return nbtypes.boolean(a, i, expected, new), codegen


@intrinsic
def pause(typingctx):
    """The spin-wait hint (x86 ``pause``): a waiting core yields its
    pipeline to its sibling and leaves the loop without a memory-order stall."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return nbtypes.none(), codegen


@intrinsic
def yield_cpu(typingctx):
    """``sched_yield()``: let the scheduler run another thread on this core
    (the C library's, found in the process by the JIT linker)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                            "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return nbtypes.none(), codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``rdtsc`` on x86): for comparing two
    intervals measured by one thread, not a clock."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return nbtypes.int64(), codegen
