"""Task pools: data and evaluation, one metric table per task.

Each pool's module is imported when the pool is first named (PEP 562): the text pools bring
`datasets` and pandas with them, about half a second of imports (and as long again at exit) that
a run with another task pool never needs.
"""

from fusion_bench.utils.lazy_exports import lazy_exports

_MODULES = {
    "BaseTaskPool": "base",
    "CLIPVisionModelTaskPool": "clip_vision",
    "CausalLMPerplexityTaskPool": "perplexity",
    "DummyTaskPool": "dummy",
    "FlanT5GLUETextGenerationTaskPool": "flan_t5_glue",
    "LMEvalHarnessTaskPool": "lm_eval_harness",
    "OpenCLIPVisionModelTaskPool": "open_clip_vision",
    "TextClassificationTaskPool": "text_classification",
}
__all__ = list(_MODULES)

__getattr__ = lazy_exports(__name__, _MODULES)
