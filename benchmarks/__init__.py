"""fastpo benchmark suites: ``python -m benchmarks run --suite kernels|e2e|all``."""
