"""The quantize-and-export tool, shipped as `vl2edge.export` (this folder is mapped there by pyproject.toml).

    build.py    export(): quantize, trace both graphs, verify against torch, write the artifact directory
    graphs.py   the vision and decoder graphs and their torch.onnx export
    ops.py      the export twins: torch modules -> ONNX Runtime contrib ops
    vision_int8.py  the int8 vision graph: static QDQ u8s8, SmoothQuant, bias correction, its gate

`vl2edge export` (or `python -m vl2edge.export`) is the command line. Depends on `vl2edge` and
`vl2edge.quant`, never the reverse; needs the `[export]` extra (torch, onnx).
"""
