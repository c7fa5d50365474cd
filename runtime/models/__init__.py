"""Model code. Kept empty on purpose: the loaders import `lowbit.runtime.models.config` (the model's
shape), and importing a submodule runs this file first, so anything imported here would reach the
loaders. The architecture registry is `registry.py`."""
