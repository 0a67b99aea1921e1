"""Shared test set-up.

The Triton kernels are tested on the CPU through Triton's interpreter, which must be switched on
before triton is first imported; the README's test command sets it as well.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
