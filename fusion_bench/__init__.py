"""fusion_bench: a Hydra-configured benchmark for model merging."""

from importlib.metadata import version

__version__ = version("fusion_bench")
