"""One backend per op, chosen once when a model is built, the way a `LinearKernel` is chosen per weight.

Each op has an ordered list of backends (`ATTENTION_BACKENDS`, `NORM_BACKENDS`,
`SAMPLER_BACKENDS`); each backend says with `can_implement` whether it can run on the engine's
device, and why not. `choose` takes the first that can and logs the choice and every refusal once
(at debug level: `LOWBIT_LOG=debug`). The layers then call their backend directly: nothing on the
hot path asks again which kernels exist. A model's decode path (runtime/layers/decode_layer.py:
each layer as one compiled call, or the eager layers) is chosen the same way, in the model's code.
"""
