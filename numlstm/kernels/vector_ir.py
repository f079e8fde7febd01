"""Sparse products written as LLVM IR: vector code LLVM does not find on its own.

Three families, for C-contiguous arrays:

* row kernels (``bsr_rows_8x1``, ``bsr_rows_1x8``): one row x (K,) times a BSR
  weight with 8x1 or 1x8 blocks, a block's eight lanes in one vector;
* the SELL kernel (``sell_rows``): one row x (K,) times a CSR weight in its
  SELL-C-sigma execution layout (``numlstm.layouts``): the C rows of a slice
  advance together, one vector of C stored values (float32/64, float16 bits
  converted in registers, or int8 widened) times the C inputs they meet,
  fetched with one gather (``llvm.masked.gather``: ``vgatherdps`` on AVX2 and
  AVX-512; LLVM scalarises it where the CPU's gathers are slow). C is
  ``SELL_LANES``, from the host CPU's vector width;
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

Row and panel kernels take float32 and float64 values, and ``panel_csr``
float16 bits and int8 values too. Indices and indptr may be any integer type;
they are validated non-negative where weights are made.

Numba's on-disk cache keys a kernel on its own source file only: after
editing this module, delete the kernel cache (the folder
``numlstm.kernels.cache.cache_root()`` names) or the cached kernels keep
the old code; touching ``cpu.py`` is not enough on numba 0.68, whose
cache stamps hash a file's content.
"""

import llvmlite.binding as llvm
from llvmlite import ir
from llvmlite.ir.instructions import GEPInstr
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # vector width in elements, and rows of x per panel
CHAINS = 4  # independent accumulators per sum
PANEL_MAX_K = 4096  # a panel's transposed copy lives on the stack: <= 256 KiB (float64)

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


def _host_lanes():
    """float32 lanes of the host's widest vector registers: 16 with AVX-512,
    8 otherwise (AVX2; on older CPUs LLVM splits the vectors, still correct)."""
    return 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8


SELL_LANES = _host_lanes()  # C of the SELL-C-sigma layout: rows per slice
# LLVM 22 dropped the alignment operand of the masked gather intrinsic.
_GATHER_HAS_ALIGN = llvm.llvm_version_info[0] < 22


class _Emitter:
    """IR helpers over one kernel's arrays (``make_array`` structs)."""

    def __init__(self, context, builder, dtype, lanes=LANES):
        self.b = builder
        self.vty = ir.VectorType(context.get_value_type(dtype), lanes)
        self.align = dtype.bitwidth // 8

    def index(self, arr, ty, k):
        """arr[k] as int64 (arr an index array of numba type ``ty``)."""
        v = self.b.load(self.b.gep(arr.data, [k]))
        return self.b.sext(v, _I64) if ty.dtype.signed else self.b.zext(v, _I64)

    def vector(self, ptr, k):
        """LANES consecutive elements from ptr + k."""
        p = self.b.bitcast(self.b.gep(ptr, [k]), self.vty.as_pointer())
        return self.b.load(p, align=self.align)

    def widened(self, vec, value_type):
        """A vector of stored values as the accumulator's type: float16 bits
        converted (``vcvtph2ps`` with F16C), int8 sign-extended, floats as they are."""
        n = vec.type.count
        if value_type == nbtypes.uint16:  # float16 bits
            halves = self.b.bitcast(vec, ir.VectorType(ir.HalfType(), n))
            return self.b.fpext(halves, ir.VectorType(self.vty.element, n))
        if value_type == nbtypes.int8:
            return self.b.sitofp(vec, ir.VectorType(self.vty.element, n))
        return vec

    def gather(self, base, columns):
        """base[columns[l]] in lane l: one masked gather with every lane on."""
        n = columns.type.count
        ptrs = GEPInstr(self.b.block, base, [columns], True, "", source_etype=self.vty.element)
        ptrs.type = ir.VectorType(ir.PointerType(), n)  # a vector GEP: one pointer a lane
        self.b._insert(ptrs)
        vty = ir.VectorType(self.vty.element, n)
        mask_ty = ir.VectorType(ir.IntType(1), n)
        suffix = f"v{n}{'f32' if self.vty.element == ir.FloatType() else 'f64'}.v{n}p0"
        operands = [ptrs, ir.Constant(mask_ty, [1] * n), ir.Constant(vty, ir.Undefined)]
        argtys = [ptrs.type, mask_ty, vty]
        if _GATHER_HAS_ALIGN:
            operands.insert(1, _I32(self.align))
            argtys.insert(1, _I32)
        fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(vty, argtys),
                                            f"llvm.masked.gather.{suffix}")
        return self.b.call(fn, operands)

    def stack_save(self):
        """Mark the stack (``stack_restore`` frees what was allocated since)."""
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(ir.PointerType(ir.IntType(8)), []), "llvm.stacksave")
        return self.b.call(fn, [])

    def stack_restore(self, mark):
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(ir.VoidType(), [mark.type]), "llvm.stackrestore")
        self.b.call(fn, [mark])

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
        """slot += a * b, as ``llvm.fmuladd``: one fused multiply-add where the
        CPU has FMA (the IR builder's fmul and fadd carry no fast-math flags,
        so LLVM would not fuse them: two vector ops where one does)."""
        ty = a.type
        elem = "f32" if ty.element == ir.FloatType() else "f64"
        fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ty, [ty, ty, ty]),
                                            f"llvm.fmuladd.v{ty.count}{elem}")
        self.b.store(self.b.call(fn, [a, b, self.b.load(slot)]), slot)

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
    """out[n0:n0+8] = x[n0:n0+8] @ W^T, ``shape`` "csr", "8x1", "1x8" or "sell"
    (a CSR weight in its SELL-C-sigma layout, ``_sell_codegen``'s arrays: a
    slice's C rows summed together, entry by entry, padding included)."""
    def codegen(context, builder, sig, args):
        out, x, data, indices, indptr, w0 = _arrays(context, builder, sig, args, 6)
        _, x_t, data_t, indices_t, indptr_t, _, _ = sig.args
        n0 = args[6]
        e, b = _Emitter(context, builder, x_t.dtype), builder
        R = cgutils.unpack_tuple(b, out.shape)[1]
        K = cgutils.unpack_tuple(b, x.shape)[1]
        stack = e.stack_save()
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
            if data_t.dtype in (nbtypes.uint16, nbtypes.int8):  # float16 bits, int8
                one = b.load(b.gep(data.data, [k]))
                wide = e.widened(b.insert_element(ir.Constant(ir.VectorType(one.type, 1),
                                                              ir.Undefined), one, _I64(0)),
                                 data_t.dtype)
                value = b.shuffle_vector(wide, ir.Constant(wide.type, ir.Undefined),
                                         ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
            else:
                value = e.broadcast(data.data, k)
            e.fma(slot, value, column(e.index(indices, indices_t, k)))

        def row_scale(acc, r):  # int8 values: times the row's float16 scale, w0 (R, 1)
            if data_t.dtype != nbtypes.int8:
                return acc
            bits = b.bitcast(b.load(b.gep(w0.data, [r])), ir.HalfType())
            scale = b.fpext(bits, e.vty.element)
            undef = ir.Constant(e.vty, ir.Undefined)
            return b.fmul(acc, b.shuffle_vector(
                b.insert_element(undef, scale, _I64(0)), undef,
                ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)))

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
                store_lanes(row_scale(e.total(slots), r), r)

        if shape == "sell":  # indptr: the slice table (nslices, 2 + C)
            # Entry by entry, all C rows of the slice at once: an entry's C
            # values are widened by one vector conversion, and each lane's is
            # broadcast from that register into its row's accumulator. Row by
            # row, float16 and int8 paid a scalar conversion per multiply-add
            # (B=16 sequences, I=64, H=256, 90%: 42 / 46 us a step against 40 /
            # 41 now; through a stack buffer instead of the register, late
            # store forwarding made float16 49).
            C = SELL_LANES
            stored = ir.VectorType(context.get_value_type(data_t.dtype), C)
            undef = ir.Constant(ir.VectorType(e.vty.element, C), ir.Undefined)
            accs = e.accumulators(C)
            nslices, width = cgutils.unpack_tuple(b, indptr.shape)
            with cgutils.for_range(b, nslices) as sl:
                row0 = b.mul(sl.index, width)
                start = e.index(indptr, indptr_t, row0)
                stop = e.index(indptr, indptr_t, b.add(row0, _I64(1)))
                e.zero(accs)
                with cgutils.for_range_slice(b, start, stop, _I64(1)) as (k, _):
                    q = b.mul(k, _I64(C))
                    vals = e.widened(b.load(b.bitcast(b.gep(data.data, [q]), stored.as_pointer()),
                                            align=data_t.dtype.bitwidth // 8), data_t.dtype)
                    for j, acc in enumerate(accs):
                        c = e.index(indices, indices_t, b.add(q, _I64(j)))
                        lane = b.shuffle_vector(vals, undef, ir.Constant(
                            ir.VectorType(_I32, LANES), [j] * LANES))
                        e.fma(acc, lane, column(c))
                for j, acc in enumerate(accs):
                    r = e.index(indptr, indptr_t, b.add(row0, _I64(2 + j)))
                    with b.if_then(b.icmp_signed(">=", r, _I64(0))):
                        store_lanes(row_scale(b.load(acc), r), r)
        else:
            e.rows(indptr, indptr_t, row)
        e.stack_restore(stack)
        return context.get_dummy_value()
    return codegen


def _sell_codegen(context, builder, sig, args):
    """on[rows] = W xn over the slices of a SELL-C-sigma layout.

    data (S, C) and indices (S, C): entry k of a slice holds, in lane l, the
    k-th stored value of the slice's row l and its column (padding: value 0,
    column 0); slices (nslices, 2 + C) int32: [start, stop) of the slice's
    entries, then the output row of each lane (-1: no row).
    """
    on, xn, data, indices, slices = _arrays(context, builder, sig, args, 5)
    _, x_t, data_t, indices_t, slices_t = sig.args
    C = SELL_LANES
    e, b = _Emitter(context, builder, x_t.dtype, C), builder
    stored = ir.VectorType(context.get_value_type(data_t.dtype), C)
    cols_ty = ir.VectorType(context.get_value_type(indices_t.dtype), C)
    slots = e.accumulators(CHAINS)

    def entry(slot, k):
        q = b.mul(k, _I64(C))
        vals = b.load(b.bitcast(b.gep(data.data, [q]), stored.as_pointer()),
                      align=data_t.dtype.bitwidth // 8)
        cols = b.load(b.bitcast(b.gep(indices.data, [q]), cols_ty.as_pointer()),
                      align=indices_t.dtype.bitwidth // 8)
        if cols_ty.element.width < 32:  # uint16 columns
            cols = b.zext(cols, ir.VectorType(_I32, C))
        e.fma(slot, e.widened(vals, data_t.dtype), e.gather(xn.data, cols))

    nslices = cgutils.unpack_tuple(b, slices.shape)[0]
    width = _I64(2 + C)
    with cgutils.for_range(b, nslices) as sl:
        row0 = b.mul(sl.index, width)
        start = e.index(slices, slices_t, row0)
        stop = e.index(slices, slices_t, b.add(row0, _I64(1)))
        e.zero(slots)
        e.chained(start, stop, slots, entry)
        acc = e.total(slots)
        for lane in range(C):
            r = b.load(b.gep(slices.data, [b.add(row0, _I64(2 + lane))]))
            with b.if_then(b.icmp_signed(">=", r, ir.Constant(r.type, 0))):
                b.store(b.extract_element(acc, _I64(lane)),
                        b.gep(on.data, [b.sext(r, _I64)]))
    return context.get_dummy_value()


@intrinsic
def sell_rows(typingctx, on, xn, data, indices, slices):
    """on (R,) = W xn (K,) for W in SELL-C-sigma layout (see ``_sell_codegen``);
    the int8 kind's row scales are applied by the caller."""
    arrays = (on, xn, data, indices, slices)
    if (all(getattr(a, "layout", "") == "C" for a in arrays)
            and xn.dtype in (nbtypes.float32, nbtypes.float64) and on.dtype == xn.dtype
            and getattr(data, "ndim", 0) == 2 and getattr(indices, "ndim", 0) == 2
            and data.dtype in (xn.dtype, nbtypes.uint16, nbtypes.int8)
            and indices.dtype in (nbtypes.uint16, nbtypes.int32)
            and slices.dtype == nbtypes.int32):
        return nbtypes.none(*arrays), _sell_codegen


# Windowed SELL (``numlstm.layouts.SellWindows``): the inputs a vector of C
# stored values meets all lie in one window of WINDOW consecutive columns, so
# a register permute picks them (one instruction, no gather). AVX-512: two
# registers, 32 columns (vpermi2ps); AVX2: one register, 8 columns (vpermps).
_FEATURES = llvm.get_host_cpu_features()
WINDOW = 2 * SELL_LANES if SELL_LANES == 16 else (8 if _FEATURES.get("avx2", False) else 0)
WINDOW_PAD = 0x80  # a local column >= this marks a padding entry (value 0)


def _permute(e, lo, idx, hi):
    """The inputs of ``idx`` (C x i32, local columns) from the window's
    registers lo (and hi: columns C .. 2C-1 on AVX-512)."""
    b = e.b
    if SELL_LANES == 16:
        fn = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(e.vty, [e.vty, idx.type, e.vty]),
            "llvm.x86.avx512.vpermi2var.ps.512")
        return b.call(fn, [lo, idx, hi])
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(e.vty, [e.vty, idx.type]),
                                        "llvm.x86.avx2.permps")
    return b.call(fn, [lo, idx])


def _window_codegen(context, builder, sig, args):
    """on[rows] = W xn over a windowed SELL layout.

    data (E, C), indices (E, C) uint8: entry e holds in lane l a value of the
    slice's row l and its column within the entry's window (>= WINDOW_PAD:
    padding); table (nslices, nwin + 1 + C) int32: per slice, the first entry
    of each of its nwin windows and the end, then the output row of each lane
    (-1: none); w0 (nslices, C) float32 lane scales for int8 values, else
    empty. x is copied into a zero-padded stack buffer of nwin * WINDOW.

    int8 values come packed with their columns, data (E, C) int16 words
    value << 8 | column (``SellWindows.words``; indices unread): one
    sign-extension gives both the permute's index (vpermi2ps reads its low
    bits) and, shifted, the value; widening two byte vectors took one more
    op on the port that also permutes.
    """
    on, xn, data, indices, table, w0 = _arrays(context, builder, sig, args, 6)
    _, x_t, data_t, _, table_t, _ = sig.args
    C = SELL_LANES
    e, b = _Emitter(context, builder, x_t.dtype, C), builder
    stored = ir.VectorType(context.get_value_type(data_t.dtype), C)
    cols_ty = ir.VectorType(ir.IntType(8), C)
    nslices, width = cgutils.unpack_tuple(b, table.shape)
    nwin = b.sub(width, _I64(1 + C))
    K = cgutils.unpack_tuple(b, xn.shape)[0]
    mark = e.stack_save()
    xpad = b.alloca(e.vty.element, size=b.mul(nwin, _I64(WINDOW)))
    with cgutils.for_range(b, b.mul(nwin, _I64(WINDOW))) as col:
        inside = b.icmp_signed("<", col.index, K)
        value = b.select(inside, b.load(b.gep(xn.data, [b.select(inside, col.index, _I64(0))])),
                         ir.Constant(e.vty.element, 0))
        b.store(value, b.gep(xpad, [col.index]))
    slots = e.accumulators(CHAINS)
    mask = ir.Constant(ir.VectorType(_I32, C), [WINDOW - 1] * C)
    packed = data_t.dtype == nbtypes.int16
    eight = ir.Constant(ir.VectorType(_I32, C), [8] * C)

    with cgutils.for_range(b, nslices) as sl:
        row0 = b.mul(sl.index, width)
        e.zero(slots)
        with cgutils.for_range(b, nwin) as win:
            start = e.index(table, table_t, b.add(row0, win.index))
            stop = e.index(table, table_t, b.add(row0, b.add(win.index, _I64(1))))
            base = b.mul(win.index, _I64(WINDOW))
            lo = e.vector(xpad, base)
            hi = e.vector(xpad, b.add(base, _I64(C))) if SELL_LANES == 16 else None

            def entry(slot, k, lo=lo, hi=hi):
                q = b.mul(k, _I64(C))
                vals = b.load(b.bitcast(b.gep(data.data, [q]), stored.as_pointer()),
                              align=data_t.dtype.bitwidth // 8)
                if packed:  # int16 words: value << 8 | column, one widening for both
                    words = b.sext(vals, ir.VectorType(_I32, C))
                    value = b.sitofp(b.ashr(words, eight), e.vty)
                    idx = b.and_(words, mask)
                else:
                    cols = b.load(b.bitcast(b.gep(indices.data, [q]), cols_ty.as_pointer()),
                                  align=1)
                    idx = b.and_(b.zext(cols, ir.VectorType(_I32, C)), mask)
                    value = e.widened(vals, data_t.dtype)
                e.fma(slot, value, _permute(e, lo, idx, hi))

            e.chained(start, stop, slots, entry)
        acc = e.total(slots)
        if data_t.dtype in (nbtypes.int8, nbtypes.int16):
            scale = b.load(b.bitcast(b.gep(w0.data, [b.mul(sl.index, _I64(C))]),
                                     e.vty.as_pointer()), align=4)
            acc = b.fmul(acc, scale)
        for lane in range(C):
            r = b.load(b.gep(table.data, [b.add(row0, b.add(nwin, _I64(1 + lane)))]))
            with b.if_then(b.icmp_signed(">=", r, ir.Constant(r.type, 0))):
                b.store(b.extract_element(acc, _I64(lane)), b.gep(on.data, [b.sext(r, _I64)]))
    e.stack_restore(mark)
    return context.get_dummy_value()


@intrinsic
def sell_windows(typingctx, on, xn, data, indices, table, w0):
    """on (R,) = W xn (K,) for W in windowed SELL layout (see ``_window_codegen``)."""
    arrays = (on, xn, data, indices, table, w0)
    if (WINDOW and all(getattr(a, "layout", "") == "C" for a in arrays)
            and xn.dtype == nbtypes.float32 and on.dtype == xn.dtype
            and getattr(data, "ndim", 0) == 2 and getattr(indices, "ndim", 0) == 2
            and data.dtype in (nbtypes.float32, nbtypes.uint16, nbtypes.int8, nbtypes.int16)
            and indices.dtype == nbtypes.uint8 and table.dtype == nbtypes.int32
            and w0.dtype == nbtypes.float32):
        return nbtypes.none(*arrays), _window_codegen


HAS_F16C = bool(_FEATURES.get("f16c", False))


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the calling function's loops with the host's widest
    registers. Its x86 targets for AVX-512 cores (Skylake server on) carry
    the tuning "prefer 256-bit vectors" (against the clock drop of 512-bit
    code on the first of them), so the loops numba leaves to LLVM came out
    8 lanes wide here, half what these cores multiply-add per instruction.
    A function attribute overrides the tuning for the one function; on a CPU
    without AVX-512 the widest legal vectors stay 256 bits, so it changes
    nothing there. llvmlite knows no string attributes, hence the set.add."""
    def codegen(context, builder, sig, args):
        if SELL_LANES == 16:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return nbtypes.none(), codegen


@intrinsic
def half_bits_to_float32(typingctx, h):
    """float16 bits (uint16) -> float32 by ``fpext half``: one ``vcvtph2ps``
    with F16C, which LLVM's loop vectoriser widens to 8 or 16 lanes. Only
    for hosts with F16C (``HAS_F16C``): elsewhere LLVM would call a runtime
    helper that numba does not link."""
    if h != nbtypes.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return nbtypes.float32(nbtypes.uint16), codegen


def applies(*arrays):
    """Whether the row and panel kernels take arrays of these numba types
    (x second, values third, as in every signature here; all C-contiguous):
    float32/float64 values of x's type, and for ``panel_csr`` also float16
    bits (uint16) or int8 values."""
    x, data = arrays[1], arrays[2]
    xdt, ddt = getattr(x, "dtype", None), getattr(data, "dtype", None)
    return ((ddt == xdt in (nbtypes.float32, nbtypes.float64)
             or (xdt in (nbtypes.float32, nbtypes.float64)
                and ddt in (nbtypes.uint16, nbtypes.int8) and getattr(data, "ndim", 0) == 1))
            and all(getattr(a, "layout", "") == "C" for a in arrays))


def _row_typer(codegen):
    def typer(typingctx, on, xn, data, indices, indptr):
        if applies(on, xn, data, indices, indptr) and data.dtype == xn.dtype:
            return nbtypes.none(on, xn, data, indices, indptr), codegen
    return typer


def _panel_typer(codegen, sell=False):
    def typer(typingctx, out, x, data, indices, indptr, w0, n0):
        arrays = (out, x, data, indices, indptr, w0)
        if sell:
            ok = (all(getattr(a, "layout", "") == "C" for a in arrays)
                  and x.dtype in (nbtypes.float32, nbtypes.float64) and out.dtype == x.dtype
                  and data.ndim == 2 and data.dtype in (x.dtype, nbtypes.uint16, nbtypes.int8)
                  and indices.ndim == 2 and indices.dtype in (nbtypes.uint16, nbtypes.int32)
                  and indptr.ndim == 2 and indptr.dtype == nbtypes.int32)
        else:
            ok = applies(*arrays)
        if ok:
            return nbtypes.none(*arrays, nbtypes.int64), codegen
    return typer


# on (R,) = W xn (K,): BSR with 8x1 / 1x8 blocks.
bsr_rows_8x1 = intrinsic(_row_typer(_row_codegen(False)))
bsr_rows_1x8 = intrinsic(_row_typer(_row_codegen(True)))

# out[n0:n0+8] = x[n0:n0+8] @ W^T: CSR of any value kind (w0: int8's (R, 1)
# scale bits, else unused), BSR 8x1, BSR 1x8.
panel_csr = intrinsic(_panel_typer(_panel_codegen("csr")))
panel_8x1 = intrinsic(_panel_typer(_panel_codegen("8x1")))
panel_1x8 = intrinsic(_panel_typer(_panel_codegen("1x8")))
# The same for a CSR weight in its SELL-C-sigma layout (a quantized weight's storage).
panel_sell = intrinsic(_panel_typer(_panel_codegen("sell"), sell=True))
