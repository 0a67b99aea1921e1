"""Benchmark suites: each module has ``cases(device, size)`` and ``build(spec)``."""
