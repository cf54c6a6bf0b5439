"""Devices around the runtime: frame sources, speech sinks, platform probes, TensorRT.

Every optional dependency is imported lazily by the module that needs it.
"""
