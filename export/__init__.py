"""Offline ONNX export and verification (`python -m export --model SRC --out DST --recipe NAME`).
Depends on `vl2edge` and `quant`, never the reverse. Its code lands with the export issue (#5); until
then this package is empty on purpose."""
