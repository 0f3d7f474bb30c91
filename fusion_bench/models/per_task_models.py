"""One model per task, as methods like TALL masks return them: task t is scored with model t.

Built on demand, one at a time: a method that keeps what the models share (θ₀, a merged task
vector, boolean masks) builds model t in one cheap pass, so memory holds one full model, not one
per task. The last model built is kept, since the program saves and then scores the same model.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import nn


class PerTaskModels(Mapping[str, nn.Module]):
    """{task: its model}; `build(task)` makes the model, or `models` holds them already built."""

    def __init__(self, names: Sequence[str], build: Callable[[str], nn.Module] | None = None, *, models: Mapping[str, nn.Module] | None = None):
        if (build is None) == (models is None):
            raise ValueError("give either build or models")
        self.names = list(names)
        self._build = build
        self._models = dict(models) if models is not None else None
        self._last: tuple[str, nn.Module] | None = None

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.names:
            raise KeyError(name)
        if self._models is not None:
            return self._models[name]
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous model before building the next
            self._last = (name, self._build(name))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:  # Mapping's would build the model
        return name in self.names

    def any_model(self) -> nn.Module:
        """A model to describe them all (they share one architecture)."""
        return self[self._last[0] if self._last else self.names[0]]
