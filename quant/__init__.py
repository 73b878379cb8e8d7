"""Offline quantizer: `python -m quant SRC DST --recipe NAME` streams a float DeepSeek-VL2 checkpoint
into a quantized model directory. The format, math and recipes live in `vl2edge` (`qlinear`,
`quantize`) because the runtime also quantizes while loading; this package is the conversion tool."""

from .convert import convert

__all__ = ["convert"]
