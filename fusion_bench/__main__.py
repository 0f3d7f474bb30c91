"""`python -m fusion_bench`: the `fusion_bench` command."""

from fusion_bench.programs.cli import main

main()
