"""Sparse products written as LLVM IR: vector code LLVM does not find on its own.

Two families, both for float32 and float64 weights and C-contiguous arrays:

* row kernels (``bsr_rows_8x1``, ``bsr_rows_1x8``): one row x (K,) times a BSR
  weight with 8x1 or 1x8 blocks, a block's eight lanes in one vector;
* panel kernels (``panel_csr``, ``panel_8x1``, ``panel_1x8``): eight rows of x
  at once. The panel is transposed into a stack buffer xt (K, 8) first, so the
  eight x values a stored weight meets are one contiguous vector: a stored
  weight costs one broadcast and one vector multiply-add for eight rows and is
  read once per panel, not once per row. (Row by row, a CSR value needs three
  scalar loads per multiply-add, and two load ports make that >= 1.5 cycles.)

Why IR: from numba's loops LLVM found neither. Eight scalar accumulators over a
block row stayed scalar (the SLP vectoriser does not pack loop-carried sums),
and the loop vectoriser strided across blocks instead, with a 64-lane
transposing shuffle per eight blocks (5 ns per 8x1 block here; 1.8 ns as IR).
Every kernel keeps several independent accumulators, because a multiply-add
has 4-5 cycles of latency. The kernels are inlined into numba functions
compiled with fast-math, whose pass flags these adds too, so LLVM fuses them
into FMAs and sums lanes as a tree.

Indices and indptr may be any integer type; they are validated non-negative
where weights are made.

Numba's on-disk cache keys a kernel on its own source file only: after
editing this module, delete the kernel cache (the folder
``numlstm.kernels.cache.cache_root()`` names) or the cached kernels keep
the old code; touching ``cpu.py`` is not enough on numba 0.68, whose
cache stamps hash a file's content.
"""

from llvmlite import ir
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # vector width in elements, and rows of x per panel
CHAINS = 4  # independent accumulators per sum
PANEL_MAX_K = 4096  # a panel's transposed copy lives on the stack: <= 256 KiB (float64)

_I64 = ir.IntType(64)


class _Emitter:
    """IR helpers over one kernel's arrays (``make_array`` structs)."""

    def __init__(self, context, builder, dtype):
        self.b = builder
        self.vty = ir.VectorType(context.get_value_type(dtype), LANES)
        self.align = dtype.bitwidth // 8

    def index(self, arr, ty, k):
        """arr[k] as int64 (arr an index array of numba type ``ty``)."""
        v = self.b.load(self.b.gep(arr.data, [k]))
        return self.b.sext(v, _I64) if ty.dtype.signed else self.b.zext(v, _I64)

    def vector(self, ptr, k):
        """LANES consecutive elements from ptr + k."""
        p = self.b.bitcast(self.b.gep(ptr, [k]), self.vty.as_pointer())
        return self.b.load(p, align=self.align)

    def broadcast(self, ptr, k):
        """ptr[k] in every lane."""
        undef = ir.Constant(self.vty, ir.Undefined)
        one = self.b.insert_element(undef, self.b.load(self.b.gep(ptr, [k])), _I64(0))
        return self.b.shuffle_vector(one, undef,
                                     ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                 [0] * LANES))

    def accumulators(self, n):
        """n vector slots (allocas that LLVM promotes to registers)."""
        return [cgutils.alloca_once(self.b, self.vty) for _ in range(n)]

    def zero(self, slots):
        for slot in slots:
            self.b.store(ir.Constant(self.vty, None), slot)

    def fma(self, slot, a, b):
        self.b.store(self.b.fadd(self.b.load(slot), self.b.fmul(a, b)), slot)

    def total(self, slots):
        acc = self.b.load(slots[0])
        for slot in slots[1:]:
            acc = self.b.fadd(acc, self.b.load(slot))
        return acc

    def lane_sum(self, vec):
        s = self.b.extract_element(vec, _I64(0))
        for lane in range(1, LANES):
            s = self.b.fadd(s, self.b.extract_element(vec, _I64(lane)))
        return s

    def rows(self, indptr, indptr_t, body):
        """for r in range(len(indptr) - 1): body(r, start, stop)."""
        b = self.b
        nrows = b.sub(cgutils.unpack_tuple(b, indptr.shape)[0], _I64(1))
        with cgutils.for_range(b, nrows) as row:
            r = row.index
            body(r, self.index(indptr, indptr_t, r),
                 self.index(indptr, indptr_t, b.add(r, _I64(1))))

    def chained(self, start, stop, slots, step):
        """step(slot, k) for k in [start, stop), k going to slot k % CHAINS
        in groups of len(slots), the tail to slots[0]."""
        b, n = self.b, len(slots)
        groups = b.udiv(b.sub(stop, start), _I64(n))
        with cgutils.for_range(b, groups) as group:
            k0 = b.add(start, b.mul(group.index, _I64(n)))
            for j, slot in enumerate(slots):
                step(slot, b.add(k0, _I64(j)))
        with cgutils.for_range_slice(b, b.add(start, b.mul(groups, _I64(n))), stop,
                                     _I64(1)) as (k, _):
            step(slots[0], k)


def _arrays(context, builder, sig, args, n):
    return [context.make_array(t)(context, builder, a)
            for t, a in zip(sig.args[:n], args[:n], strict=True)]


def _row_codegen(wide):
    """on = W xn for 8x1 blocks (``wide=False``) or 1x8 blocks."""
    def codegen(context, builder, sig, args):
        on, xn, data, indices, indptr = _arrays(context, builder, sig, args, 5)
        _, _, data_t, indices_t, indptr_t = sig.args
        e, b = _Emitter(context, builder, data_t.dtype), builder
        slots = e.accumulators(CHAINS)

        def block(slot, k):
            col = e.index(indices, indices_t, k)
            vals = e.vector(data.data, b.mul(k, _I64(LANES)))
            xv = (e.vector(xn.data, b.mul(col, _I64(LANES))) if wide  # 8 inputs
                  else e.broadcast(xn.data, col))  # one input for 8 rows
            e.fma(slot, vals, xv)

        def row(r, start, stop):
            e.zero(slots)
            e.chained(start, stop, slots, block)
            acc = e.total(slots)
            if wide:
                b.store(e.lane_sum(acc), b.gep(on.data, [r]))
            else:
                dst = b.gep(on.data, [b.mul(r, _I64(LANES))])
                b.store(acc, b.bitcast(dst, e.vty.as_pointer()), align=e.align)

        e.rows(indptr, indptr_t, row)
        return context.get_dummy_value()
    return codegen


def _panel_codegen(shape):
    """out[n0:n0+8] = x[n0:n0+8] @ W^T, ``shape`` "csr", "8x1" or "1x8"."""
    def codegen(context, builder, sig, args):
        out, x, data, indices, indptr = _arrays(context, builder, sig, args, 5)
        _, _, data_t, indices_t, indptr_t, _ = sig.args
        n0 = args[5]
        e, b = _Emitter(context, builder, data_t.dtype), builder
        R = cgutils.unpack_tuple(b, out.shape)[1]
        K = cgutils.unpack_tuple(b, x.shape)[1]
        i8p = ir.PointerType(ir.IntType(8))
        save = cgutils.get_or_insert_function(b.module, ir.FunctionType(i8p, []),
                                              "llvm.stacksave")
        restore = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [i8p]), "llvm.stackrestore")
        stack = b.call(save, [])
        xt = b.alloca(e.vty.element, size=b.mul(K, _I64(LANES)))  # (K, 8)
        with cgutils.for_range(b, K) as col:
            for j in range(LANES):
                src = b.gep(x.data, [b.add(b.mul(b.add(n0, _I64(j)), K), col.index)])
                dst = b.gep(xt, [b.add(b.mul(col.index, _I64(LANES)), _I64(j))])
                b.store(b.load(src), dst)

        def column(c):  # the panel's eight x values of input column c
            return e.vector(xt, b.mul(c, _I64(LANES)))

        def store_lanes(vec, r):  # out[n0 + j, r] = vec[j]
            for j in range(LANES):
                dst = b.gep(out.data, [b.add(b.mul(b.add(n0, _I64(j)), R), r)])
                b.store(b.extract_element(vec, _I64(j)), dst)

        slots = e.accumulators(LANES if shape == "8x1" else CHAINS)

        def csr_value(slot, k):
            e.fma(slot, e.broadcast(data.data, k), column(e.index(indices, indices_t, k)))

        def block(k):
            c = e.index(indices, indices_t, k)
            q = b.mul(k, _I64(LANES))
            if shape == "8x1":  # one column of x, eight weight rows
                xv = column(c)
                for i, slot in enumerate(slots):
                    e.fma(slot, e.broadcast(data.data, b.add(q, _I64(i))), xv)
            else:  # "1x8": one weight row, eight columns of x
                c8 = b.mul(c, _I64(LANES))
                for j in range(LANES):
                    e.fma(slots[j % CHAINS], e.broadcast(data.data, b.add(q, _I64(j))),
                          column(b.add(c8, _I64(j))))

        def row(r, start, stop):
            e.zero(slots)
            if shape == "csr":
                e.chained(start, stop, slots, csr_value)
            else:
                with cgutils.for_range_slice(b, start, stop, _I64(1)) as (k, _):
                    block(k)
            if shape == "8x1":
                for i, slot in enumerate(slots):
                    store_lanes(b.load(slot), b.add(b.mul(r, _I64(LANES)), _I64(i)))
            else:
                store_lanes(e.total(slots), r)

        e.rows(indptr, indptr_t, row)
        b.call(restore, [stack])
        return context.get_dummy_value()
    return codegen


def applies(*arrays):
    """Whether these kernels take arrays of these numba types (float values
    last-but-two, as in every signature here; all C-contiguous)."""
    data = arrays[2]
    return (getattr(data, "dtype", None) in (nbtypes.float32, nbtypes.float64)
            and all(getattr(a, "layout", "") == "C" for a in arrays))


def _row_typer(codegen):
    def typer(typingctx, on, xn, data, indices, indptr):
        if applies(on, xn, data, indices, indptr):
            return nbtypes.none(on, xn, data, indices, indptr), codegen
    return typer


def _panel_typer(codegen):
    def typer(typingctx, out, x, data, indices, indptr, n0):
        if applies(out, x, data, indices, indptr):
            return nbtypes.none(out, x, data, indices, indptr, nbtypes.int64), codegen
    return typer


# on (R,) = W xn (K,): BSR with 8x1 / 1x8 blocks.
bsr_rows_8x1 = intrinsic(_row_typer(_row_codegen(False)))
bsr_rows_1x8 = intrinsic(_row_typer(_row_codegen(True)))

# out[n0:n0+8] = x[n0:n0+8] @ W^T: float CSR, BSR 8x1, BSR 1x8.
panel_csr = intrinsic(_panel_typer(_panel_codegen("csr")))
panel_8x1 = intrinsic(_panel_typer(_panel_codegen("8x1")))
panel_1x8 = intrinsic(_panel_typer(_panel_codegen("1x8")))
