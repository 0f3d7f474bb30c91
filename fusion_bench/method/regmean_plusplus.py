"""RegMean++ (Nguyen et al., 2025, arXiv 2508.03121): RegMean layer by layer, each layer's Gram
matrices taken from the inputs that the already-merged earlier layers produce.

1. Every parameter outside the model's list of layers (embeddings, pre- and post-layer norms, a
   pooler) is the task models' mean.
2. Each task's examples run through that partly merged model up to the first layer; the inputs of
   the first layer are kept (for the drawn examples: one layer's activations per task).
3. For layer l: task t's own layer l runs on task t's kept inputs, and hooks take the Gram matrix of
   each of its nn.Linear's inputs; layer l is merged from those (RegMean for the linear weights, the
   mean for the rest); the merged layer l then maps every task's inputs to the inputs of layer l+1.

The Grams depend on the merge (through the earlier merged layers), so they are not cached.
"""

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion_bench.merging.regmean import RegMeanAccumulator
from fusion_bench.method.base import MergeInputs, output_model
from fusion_bench.method.data_settings import device_batches
from fusion_bench.method.regmean import GramRecorder, RegMeanAlgorithm, linear_modules, mean_tensor
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.progress import progress_bar


class LayerInput(NamedTuple):
    """One batch's call of a layer: its positional and keyword arguments (the hidden states first,
    or as `hidden_states`), and the batch's attention mask, which leaves padding out of the Grams."""

    args: tuple
    kwargs: dict
    attention_mask: Tensor | None

    def hidden(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Tensor) -> "LayerInput":
        if self.args:
            return self._replace(args=(hidden, *self.args[1:]))
        return self._replace(kwargs={**self.kwargs, "hidden_states": hidden})


class _FirstLayerReached(Exception):
    pass


def model_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's blocks: its longest nn.ModuleList (vision_model.encoder.layers for CLIP,
    encoder.layer for BERT), the first such list when two are as long."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise InputError(
            f"RegMean++ merges one stack of layers in order, and {type(model).__name__} is an encoder-decoder with two; use method=regmean/regmean"
        )
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        raise InputError(f"RegMean++ merges a model layer by layer, and {type(model).__name__} has no list of layers (nn.ModuleList); use method=regmean/regmean")
    return max(lists, key=lambda item: len(item[1]))


def first_layer_inputs(model: nn.Module, first_layer: nn.Module, batches) -> list[LayerInput]:
    """What `model` passes its first layer on each batch; the rest of the forward is skipped."""

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _FirstLayerReached(args, kwargs)

    handle = first_layer.register_forward_pre_hook(stop, with_kwargs=True)
    captured = []
    try:
        for batch in batches:
            try:
                model(**batch.inputs)
            except _FirstLayerReached as reached:
                args, kwargs = reached.args
                captured.append(LayerInput(args, kwargs, batch.inputs.get("attention_mask")))
            else:
                raise RuntimeError(f"{type(model).__name__}'s forward never called its first layer")
    finally:
        handle.remove()
    return captured


def layer_output(layer: nn.Module, call: LayerInput, parameters: Mapping[str, Tensor] | None = None) -> Tensor:
    output = functional_call(layer, dict(parameters), call.args, call.kwargs) if parameters else layer(*call.args, **call.kwargs)
    return output if isinstance(output, Tensor) else output[0]


class RegMeanAlgorithmPlusPlus(RegMeanAlgorithm):
    """RegMean++: RegMean's keys and rules, layer by layer on the merged model's activations.

    Memory: the merged model, one task's copy of one layer, and one layer's inputs for every
    task's drawn examples (num_regmean_examples × tokens × width per task)."""

    method_name = "RegMean++"

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool, inputs, excluded, data = self.prepare(modelpool)
        device = self.method_device()
        tasks = pool.model_names
        keys = [key for key in inputs.keys if key not in excluded]
        merge_keys = set(keys)
        merged = output_model(pool, PRETRAINED, keys, runs=True).to(device).eval()
        layers_name, layers = model_layers(merged)
        target = merged.state_dict()
        in_layers = f"{layers_name}."
        for key in keys:
            if not key.startswith(in_layers):
                target[key].copy_(mean_tensor(inputs, key))

        states = {}
        for task in tasks:
            batches = progress_bar(device_batches(data[task], self.dataloader, device), total=len(data[task].batches), desc=f"RegMean++ inputs of {task}")
            states[task] = first_layer_inputs(merged, layers[0], batches)

        names = {alias: key for key in inputs.pretrained for alias in inputs.pretrained.aliases(key)}
        for index, layer in enumerate(progress_bar(layers, desc="RegMean++ layers")):
            prefix = f"{layers_name}.{index}."
            own = [name for name, _ in layer.named_parameters()] + [name for name, _ in layer.named_buffers() if prefix + name in names]
            accumulators: dict[str, RegMeanAccumulator] = {}
            for task in tasks:
                parameters = {name: inputs.finetuned[task][names[prefix + name]].to(device) for name in own}
                recorder = GramRecorder(linear_modules(layer))
                try:
                    for call in states[task]:
                        recorder.attention_mask = call.attention_mask
                        layer_output(layer, call, parameters)
                finally:
                    grams = recorder.close()
                for module, gram in grams.items():
                    weight = parameters.get(f"{module}.weight")
                    if weight is not None and names.get(f"{prefix}{module}.weight") in merge_keys:
                        accumulators.setdefault(module, RegMeanAccumulator(self.reduce_non_diagonal_ratio, self.weight_transpose)).add(gram, weight)
                del parameters
            self.merge_layer(prefix, keys, target, inputs, accumulators, tasks)
            if index + 1 < len(layers):
                for task in tasks:
                    states[task] = [call.with_hidden(layer_output(layer, call)) for call in states[task]]
        return merged.to("cpu")

    def merge_layer(self, prefix: str, keys: list[str], target: dict[str, Tensor], inputs: MergeInputs, accumulators: dict[str, RegMeanAccumulator], tasks: list[str]) -> None:
        """Write layer `prefix`'s merged tensors: RegMean where every task gave a Gram, else the mean."""
        for key in (key for key in keys if key.startswith(prefix)):
            accumulator = accumulators.get(key[len(prefix) :].removesuffix(".weight")) if key.endswith(".weight") else None
            if accumulator is not None and accumulator.tasks == len(tasks):
                target[key].copy_(self.merged_weight(key, accumulator.solve()))
            else:
                target[key].copy_(mean_tensor(inputs, key))


class RegMeanAlgorithmForCLIPPlusPlus(RegMeanAlgorithmPlusPlus):
    """RegMean++ on a CLIPVisionModelPool with train_datasets (FusionBench's class and keys)."""
