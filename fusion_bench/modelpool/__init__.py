"""Model pools: where models come from, handed out whole or as lazy state dicts.

Each pool's module is imported when the pool is first named (PEP 562): the offline pool brings
fine-tuning and `datasets` with it, about a second of imports that merging local checkpoints never
needs.
"""

from fusion_bench.utils.lazy_exports import lazy_exports

_MODULES = {
    "AutoModelPool": "huggingface",
    "BaseModelPool": "base",
    "CausalLMPool": "causal_lm",
    "CLIPVisionModelPool": "clip_vision",
    "LazyStateDict": "lazy_state_dict",
    "OfflineTextPool": "offline_text",
    "OpenCLIPVisionModelPool": "open_clip_vision",
    "Seq2SeqLMPool": "seq2seq_lm",
}
__all__ = list(_MODULES)

__getattr__ = lazy_exports(__name__, _MODULES)
