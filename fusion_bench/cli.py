"""The `fusion_bench` command: compose the config with Hydra, build the program, run it.

Bad input (InputError) ends the run with its message on one line and exit status 2.
"""

import gc
import sys

import hydra
from omegaconf import DictConfig

from fusion_bench.errors import InputError
from fusion_bench.instantiate import instantiate_checked


@hydra.main(config_path="pkg://fusion_bench_config", config_name="fusion_bench", version_base=None)
def _run(config: DictConfig) -> None:
    try:
        instantiate_checked(config, "root").run()
    except InputError as error:
        print(f"fusion_bench: error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        _run()
    finally:
        # Nothing is collected after the run, yet at exit the interpreter would sweep the half
        # million objects that torch and transformers create, about a second; frozen, it skips them.
        gc.freeze()


if __name__ == "__main__":
    main()
