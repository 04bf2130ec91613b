import os

# Tests run on CPU with one device unless a test starts its own subprocess (multi-device tests do).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
