"""The one module-rewrite primitive: walk a module tree and swap modules chosen by a function.

Quantizing while loading (Linear -> QLinear, DenseExperts -> QuantExperts), offloading (experts ->
OffloadedExperts) and the ONNX export (modules -> their export twins) all rewrite the tree through
`swap_modules`, as mlx-lm's `nn.quantize(class_predicate)` does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Replace = Callable[[str, nn.Module], "nn.Module | None"]


def swap_modules(root: nn.Module, replace: Replace, prefix: str = "") -> int:
    """Call `replace(qualified_name, module)` on every module below `root`, parents before children;
    a module it returns takes the old one's place (the replacement is not walked into). Returns the
    number of modules swapped."""
    swapped = 0
    for name, child in list(root.named_children()):
        qualified = f"{prefix}{name}"
        new = replace(qualified, child)
        if new is not None and new is not child:
            root.register_module(name, new)
            swapped += 1
        else:
            swapped += swap_modules(child, replace, qualified + ".")
    return swapped
