"""The `fusion_bench` command: compose the config with Hydra, build the program, run it.

Bad input (InputError) ends the run with its message on one line and exit status 2.
"""

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
    _run()


if __name__ == "__main__":
    main()
