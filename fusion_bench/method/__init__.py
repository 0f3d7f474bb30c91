"""Merging methods: each a class whose constructor arguments are its config keys."""

from fusion_bench.method.base import BaseAlgorithm
from fusion_bench.method.dummy import DummyAlgorithm
from fusion_bench.method.simple_average import SimpleAverageAlgorithm
from fusion_bench.method.task_arithmetic import TaskArithmeticAlgorithm
from fusion_bench.method.ties_merging import TiesMergingAlgorithm

__all__ = ["BaseAlgorithm", "DummyAlgorithm", "SimpleAverageAlgorithm", "TaskArithmeticAlgorithm", "TiesMergingAlgorithm"]
