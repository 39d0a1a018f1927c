"""The native decode step: decode_step.c (one fp32 batch-1 decode step in one OpenMP region) and library.py
(compiled at first use into the caprese cache, loaded with ctypes). Driven by caprese.runtime.native_backend."""
