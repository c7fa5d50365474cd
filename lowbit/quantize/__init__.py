"""The offline quantizer: what `lowbit quantize` and `lowbit eval` run, and serving never does.

calibration (sample windows, capture layer inputs), the algorithms (gptq, awq, smoothquant; RTN
stays in `runtime/quant/rtn.py` because quantize-on-load uses it), the pipeline that quantizes a
whole model, perplexity evaluation, the scheme comparison `lowbit eval` prints, and the standard
calibration/evaluation text. It may import the runtime, the loaders and the kernels; nothing in
them imports it back. Kept empty so that importing one tool does not load the others.
"""
