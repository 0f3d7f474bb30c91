"""LoRA adapters (peft) as weight deltas, without building the adapted model.

An adapter changes each adapted Linear weight W₀ by ΔW = s·B·A (s = α/r, or α/√r with rsLoRA,
per module as peft resolves rank and alpha patterns) and nothing else. peft's merge_and_unload()
computes W₀ + ΔW in place; `LoraStateDict` computes the same tensor, bit for bit, one weight at a
time and only when asked, and knows which weights the adapter leaves alone.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.utils.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."  # how a PeftModel saves the adapted model's module names


def is_adapter(path: Path) -> bool:
    """Whether `path` is a peft adapter folder rather than a model."""
    return (path / ADAPTER_CONFIG).is_file()


class LoraAdapter:
    """A peft LoRA adapter's factors, by the state-dict key of the weight each one changes.

    `architecture` builds the base model on the meta device: peft injects its layers there to say
    which modules the adapter targets and with what scaling, and no base weight is read.
    Anything merge_and_unload() would do beyond adding s·B·A to Linear weights (DoRA, LoRA biases,
    modules_to_save, trainable tokens) is refused with an InputError.
    """

    def __init__(self, path: Path, architecture: Callable[[], nn.Module], name: str):
        from peft import PeftConfig, PeftType, inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.utils import load_peft_weights

        self.path, self.name = path, name
        config = PeftConfig.from_pretrained(str(path))
        if config.peft_type != PeftType.LORA:
            raise self._unsupported(f"it is a {config.peft_type.value} adapter, not LoRA")
        model = inject_adapter_in_model(config, architecture(), low_cpu_mem_usage=True)
        weights = {key.removeprefix(_PEFT_PREFIX): value for key, value in load_peft_weights(str(path), device="cpu").items()}
        self._factors: dict[str, tuple[Tensor, Tensor, float, bool]] = {}
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            variants = getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get("default")  # DoRA and kin
            if type(module) is not LoraLinear or variants or getattr(module, "lora_bias", {}).get("default"):
                raise self._unsupported(f"it adapts {module_name!r} with more than a plain LoRA on a Linear layer")
            factors = [weights.pop(f"{module_name}.lora_{part}.weight", None) for part in "AB"]
            if any(factor is None for factor in factors):
                raise InputError(f"adapter {name!r} ({path}) lacks the LoRA weights of {module_name!r}; is it an adapter of this base model?")
            self._factors[f"{module_name}.weight"] = (*factors, module.scaling["default"], module.fan_in_fan_out)
        if weights:
            raise self._unsupported(f"it also holds {', '.join(sorted(weights)[:3])}")

    def keys(self) -> list[str]:
        """The state-dict keys of the weights the adapter changes."""
        return list(self._factors)

    def delta(self, key: str) -> Tensor:
        """ΔW = s·B·A for weight `key`, as peft's get_delta_weight computes it (float32 factors)."""
        lora_a, lora_b, scaling, fan_in_fan_out = self._factors[key]
        product = lora_b.float() @ lora_a.float()
        return (product.T if fan_in_fan_out else product) * scaling

    def apply(self, key: str, base: Tensor) -> Tensor:
        """W₀ + ΔW in W₀'s dtype, as merge_and_unload() leaves the weight."""
        delta = self.delta(key)
        if delta.shape != base.shape:
            raise InputError(
                f"adapter {self.name!r} changes {key!r} by a {tuple(delta.shape)} delta, but the base model's weight is "
                f"{tuple(base.shape)}; is it an adapter of this base model?"
            )
        return torch.add(base, delta).to(base.dtype)

    def _unsupported(self, why: str) -> InputError:
        return InputError(f"adapter {self.name!r} ({self.path}) cannot be merged in delta space: {why}; use merge_space: dense")


class LoraStateDict(LazyStateDict):
    """The tensors of a base model with a LoRA adapter merged in, each computed when read:
    W₀ + ΔW for the adapted weights, the base's own tensor for every other key."""

    def __init__(self, base: LazyStateDict, adapter: LoraAdapter):
        missing = [key for key in adapter.keys() if key not in base]
        if missing:
            raise InputError(f"adapter {adapter.name!r} changes {missing[0]!r}, which the base model lacks; is it an adapter of this base model?")
        self.base, self.adapter = base, adapter
        self.changed_keys = frozenset(adapter.keys())

    def __getitem__(self, key: str) -> Tensor:
        tensor = self.base[key]
        return self.adapter.apply(key, tensor) if key in self.changed_keys else tensor

    def __contains__(self, key: object) -> bool:  # Mapping's would compute the tensor
        return key in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, key: str) -> torch.Size:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def aliases(self, key: str) -> tuple[str, ...]:
        return self.base.aliases(key)
