"""Merging methods: each a class whose constructor arguments are its config keys.

Importable from here under FusionBench's names; each is imported on first use.
"""

from fusion_bench.utils.lazy_exports import lazy_exports

_MODULES = {
    "BaseAlgorithm": "base",
    "DummyAlgorithm": "dummy",
    "SimpleAverageAlgorithm": "simple_average",
    "TaskArithmeticAlgorithm": "task_arithmetic",
    "TiesMergingAlgorithm": "ties_merging",
    "WeightedAverageAlgorithm": "weighted_average",
    "MagMaxAlgorithm": "magmax",
    "TaskSingularVectorMerging": "task_singular_vector",
    "ISO_C_Merge": "isotropic_merging",
    "ISO_CTS_Merge": "isotropic_merging",
    "IsotropicMergingInCommonSubspace": "isotropic_merging",
    "IsotropicMergingInCommonAndTaskSubspace": "isotropic_merging",
    "WUDIMerging": "wudi",
    "DareSimpleAverage": "dare",
    "DareTaskArithmetic": "dare",
    "DareTiesMerging": "dare",
    "TallMaskTaskArithmeticAlgorithm": "tall_mask",
    "ConsensusTaskArithmetic": "consensus",
    "ConsensusTiesMerging": "consensus",
    "ModelBreadcrumbs": "breadcrumbs",
    "FisherMergingAlgorithm": "fisher_merging",
    "FisherMergingForCLIPVisionModel": "fisher_merging",
    "RegMeanAlgorithm": "regmean",
    "RegMeanAlgorithmForCLIP": "regmean",
    "RegMeanAlgorithmPlusPlus": "regmean_plusplus",
    "RegMeanAlgorithmForCLIPPlusPlus": "regmean_plusplus",
    "TaskWiseAdaMergingAlgorithm": "adamerging",
    "LayerWiseAdaMergingAlgorithm": "adamerging",
    "CLIPTaskWiseAdaMergingAlgorithm": "adamerging",
    "CLIPLayerWiseAdaMergingAlgorithm": "adamerging",
}
__all__ = list(_MODULES)

__getattr__ = lazy_exports(__name__, _MODULES)
