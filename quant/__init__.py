"""Offline quantizer (`python -m quant SRC DST --recipe NAME`): recipes, RTN/HQQ math, checkpoint
conversion. Depends on `vl2edge`, never the reverse. Its code lands with the quantization issue (#4);
until then this package is empty on purpose."""
