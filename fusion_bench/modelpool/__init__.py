"""Model pools: where models come from, handed out whole or as lazy state dicts."""

from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
from fusion_bench.modelpool.huggingface import AutoModelPool
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.modelpool.offline_text import OfflineTextPool
from fusion_bench.modelpool.seq2seq_lm import Seq2SeqLMPool

__all__ = ["AutoModelPool", "BaseModelPool", "CLIPVisionModelPool", "LazyStateDict", "OfflineTextPool", "Seq2SeqLMPool"]
