"""Triton kernels over the packed 4/8-bit weight format (`vl2edge.quant.format`), read in place.

`dequant.load_weight_tile` is the one in-register dequantization helper; `moe.moe_experts` runs the
routed experts of decode-sized token batches, `linear.qlinear` the dense quantized linears. Importing
these modules needs triton; nothing here is imported by the rest of the package unless asked for.
"""
