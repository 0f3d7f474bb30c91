"""Plumbing shared by the parts (errors, caching, atomic writes, instantiation, progress bars),
and FusionBench's utility names: `fusion_bench.utils.instantiate`, `count_parameters`, and the
modules `fusion_bench.utils.state_dict_arithmetic` and `fusion_bench.utils.parameters`.
Each name is imported on first use."""

from fusion_bench.utils.lazy_exports import lazy_exports

_MODULES = {
    "count_parameters": "parameters",
    "human_readable": "parameters",
    "instantiate": "instantiation",
    **{
        name: "state_dict_arithmetic"
        for name in (
            "num_params_of_state_dict", "state_dict_add", "state_dict_add_scalar", "state_dict_avg", "state_dict_binary_mask",
            "state_dict_diff_abs", "state_dict_div", "state_dict_flatten", "state_dict_hadamard_product", "state_dict_interpolation",
            "state_dict_mul", "state_dict_power", "state_dict_sub", "state_dict_sum", "state_dict_to_device",
            "state_dict_weighted_sum", "state_dicts_check_keys",
        )
    },
}  # fmt: skip
__all__ = list(_MODULES)

__getattr__ = lazy_exports(__name__, _MODULES)
