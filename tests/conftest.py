"""Hypothesis profiles: ``ci`` (default) bounds examples and drops deadlines so
that Numba compile time never flakes a test; ``dev`` explores more."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two-thread kernels compile on the caller's thread at the first step that
# wants them, so that a test sees the threads its settings ask for from its
# first step (the library's default compiles them in the background:
# tests/test_compile.py tests that).
os.environ.setdefault("NUMLSTM_PAIR_COMPILE", "now")


# Tests that start processes of their own (the benchmarks' quick run, the
# examples) run last: by then this run has filled the kernel cache those
# processes share ($XDG_CACHE_HOME/numlstm), so they load kernels instead of
# compiling them again.
_LAST = ("test_benchmarks_smoke.py", "test_examples.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in _LAST)
