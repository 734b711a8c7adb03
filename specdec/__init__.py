"""specdec: lossless speculative decoding with FSPAD / EAGLE-2 draft heads.

The library both services, training and benchmarks import. Nothing here reads the
environment or touches I/O at import time.
"""

__version__ = "0.1.0"
