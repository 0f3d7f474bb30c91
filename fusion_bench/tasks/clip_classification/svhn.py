"""SVHN (Netzer et al., 2011), cropped digits: house-number digits 0-9.

CLIP (Radford et al., 2021) and FusionBench prompt it exactly as MNIST: the same ten digit classes
and the same template."""

from fusion_bench.tasks.clip_classification.mnist import classnames, templates

__all__ = ["classnames", "templates"]
