"""Quantization, shipped as `vl2edge.quant` (this folder is mapped there by pyproject.toml).

    format.py      the packed 4/8-bit format: QuantSpec, pack/unpack, dequantize (numpy; no torch)
    quantizers.py  RTN and MSE quantizers: float rows -> packed (numpy; no torch)
    recipes.py     recipes (which tensor gets which spec) and quantization.json (no torch)
    convert.py     the streaming float -> quantized checkpoint converter (`vl2edge quantize`; no torch)
    modules.py     the torch modules over packed weights: QLinear, QuantExperts
"""
