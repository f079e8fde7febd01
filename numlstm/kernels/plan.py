"""One kernel call per stream step: every layer's arrays bound once in a StructRef.

A ``Stream`` calls ``lstm_step`` for each layer. Called from Python, each call
unboxes its ~19 arrays, and numba makes an NRT MemInfo for every one (about
0.1 us each, and 38 heap allocations per step for two layers). Here the
per-layer argument tuples are unboxed once, when the stream binds, into a
``StepPlan`` (a numba StructRef whose single field is the tuple of layer
tuples), and ``stream_step(plan)`` runs all layers in one call: no array
crosses the boundary per step, so a step makes no NRT allocation.

CPU only: a stream on the GPU launches its kernels per layer (they take device
arrays, which cost no MemInfo of numba's CPU runtime).
"""

from llvmlite import ir
from numba import literal_unroll, njit, typeof
from numba import types as nbtypes
from numba.core import cgutils
from numba.experimental import structref
from numba.extending import NativeValue, box, overload, unbox

from numlstm.kernels.cpu import _OPTS, lstm_step


@structref.register
class StepPlanType(nbtypes.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, nbtypes.unliteral(t)) for name, t in fields)


class StepPlan(structref.StructRefProxy):
    """The bound arguments of one stream step: ``layers``, a tuple with one
    ``lstm_step`` argument tuple per layer (made by ``make_plan``)."""


@box(StepPlanType)
def _box_plan(typ, val, c):
    """A StepPlan proxy around the plan's MemInfo (as numba's own boxing)."""
    plan = cgutils.create_struct_proxy(typ)(c.context, c.builder, value=val)
    meminfo = c.box(nbtypes.MemInfoPointer(nbtypes.voidptr), plan.meminfo)
    ctor = c.pyapi.unserialize(c.pyapi.serialize_object(StepPlan._numba_box_))
    ty = c.pyapi.unserialize(c.pyapi.serialize_object(typ))
    res = c.pyapi.call_function_objargs(ctor, [ty, meminfo])
    for obj in (ctor, ty, meminfo):
        c.pyapi.decref(obj)
    return res


@unbox(StepPlanType)
def _unbox_plan(typ, obj, c):
    """The plan's MemInfo, read with an interned attribute name. numba's own
    unboxing reads ``_meminfo`` with a new string on every call, and
    CPython's type attribute cache keeps the string it was looked up with:
    a stream step would leave a 57-byte string behind in a cache slot now
    and then (a few KiB in all, bounded, but visible to tracemalloc as
    growth in a stream that must hold constant memory)."""
    intern = cgutils.get_or_insert_function(
        c.builder.module, ir.FunctionType(c.pyapi.pyobj, [c.pyapi.cstring]),
        "PyUnicode_InternFromString")
    name = c.builder.call(intern, [c.context.insert_const_string(c.builder.module, "_meminfo")])
    mi_obj = c.pyapi.object_getattr(obj, name)
    c.pyapi.decref(name)
    mi = c.unbox(nbtypes.MemInfoPointer(nbtypes.voidptr), mi_obj).value
    plan = cgutils.create_struct_proxy(typ)(c.context, c.builder)
    plan.meminfo = mi
    c.pyapi.decref(mi_obj)
    return NativeValue(plan._getvalue())


def _new_plan(layers):
    """A StepPlan holding ``layers`` (jit code only)."""


@overload(_new_plan, jit_options=_OPTS)
def _new_plan_overload(layers):
    plan_type = StepPlanType([("layers", layers)])

    def impl(layers):
        plan = structref.new(plan_type)
        plan.layers = layers
        return plan
    return impl


@njit(**_OPTS)
def make_plan(layers):
    """Bind ``layers`` (a tuple of ``lstm_step`` argument tuples, bottom layer
    first) into a StepPlan; the arrays are shared, not copied."""
    return _new_plan(layers)


@njit(**_OPTS)
def stream_step(plan):
    """``lstm_step(*layer)`` for every layer of the plan, bottom first."""
    for layer in literal_unroll(plan.layers):
        lstm_step(*layer)


def compiled_step(plan):
    """``stream_step`` compiled for this plan's type, as a callable that skips
    the dispatcher: numba's dispatcher types a StructRef argument in Python
    on every call (~0.7 us), and the compiled entry point takes the plan as
    it is. Compiles (or loads from the cache) on first use of a type."""
    key = (typeof(plan),)
    if key not in stream_step.overloads:
        stream_step.compile(key)
    return stream_step.overloads[key].entry_point
