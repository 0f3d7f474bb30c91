"""A checkpoint's tensors as a module, without the model's class: what a merge writes into when
nothing will run the result (the program only saves it, or counts its parameters).

Building a transformers model imports its modeling code and initialises it, seconds and hundreds
of MB that a merge of a few seconds does not need. This module has the model's state dict
(the same names, tied entries sharing one tensor, buffers as buffers), so a method merges into it
exactly as into the model, and save_pretrained writes it in the layout of the checkpoint it came
from, beside that checkpoint's config files: it loads wherever the base model loads.
"""

import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

CONFIG_FILES = ("config.json", "generation_config.json")


class UnbuiltModel(nn.Module):
    """tensors: {state-dict key: tensor}, one key per tensor; aliases: {key: all its names};
    buffers: the names that are buffers; checkpoint_names: {state-dict name: its name in the
    checkpoint} for the names save_pretrained writes; config_folder: the checkpoint's folder,
    whose config files save_pretrained copies."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        aliases: Mapping[str, Sequence[str]],
        buffers: Collection[str],
        checkpoint_names: Mapping[str, str],
        config_folder: Path,
    ):
        super().__init__()
        for key, tensor in tensors.items():
            shared = tensor if key in buffers else nn.Parameter(tensor)
            for name in aliases.get(key, (key,)):
                module_name, _, attribute = name.rpartition(".")
                module = self._submodule_creating(module_name)
                if name in buffers:
                    module.register_buffer(attribute, shared)
                else:
                    module.register_parameter(attribute, shared)
        self.checkpoint_names = dict(checkpoint_names)
        self.config_folder = Path(config_folder)

    def _submodule_creating(self, path: str) -> nn.Module:
        module = self
        for part in path.split(".") if path else ():
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        return module

    def save_pretrained(self, path: str | Path) -> None:
        """model.safetensors under the checkpoint's names, and the checkpoint's config files."""
        path = Path(path)
        state_dict = self.state_dict()
        written, seen = {}, set()
        for name, checkpoint_name in self.checkpoint_names.items():
            tensor = state_dict[name]
            # safetensors stores each tensor once: a tied name the checkpoint held separately gets a copy
            written[checkpoint_name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
            seen.add(tensor.data_ptr())
        save_file(written, str(path / "model.safetensors"), metadata={"format": "pt"})
        for config_file in CONFIG_FILES:
            if (self.config_folder / config_file).is_file():
                shutil.copyfile(self.config_folder / config_file, path / config_file)
