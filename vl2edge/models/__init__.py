"""The PyTorch side of vl2edge (everything that imports torch lives here, in `vl2edge.quant.modules`
and in `vl2edge.export`).

    model.py     VL2Model: vision tower -> projector -> tile layout -> language model; decoder interface
    vision.py    the SigLIP tower
    language.py  DeepSeekMoE language model (MHA, MLA, routers, MoE)
    experts.py   the experts seam and the dense experts
    cache.py     the Cache protocol and the preallocated KVCache
    offload.py   expert offloading (CPU blob stores, device slot pools, prefetch)
    swap.py      the one module-rewrite primitive
    loading.py   load_model: config -> build -> sanitize -> quantize -> assign -> place -> prepare
"""
