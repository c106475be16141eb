"""Pure-Python kernel twins of the native extension.

Each module mirrors a folder of ``cpp/`` one to one: ``aggregate_numpy`` / ``aggregate_numba`` mirror
``cpp/aggregate``, ``quantize_numpy`` / ``quantize_numba`` mirror ``cpp/quantize``. The NumPy modules
are the readable definition of correct; every backend produces bit-identical results to them.
"""
