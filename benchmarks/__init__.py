"""Benchmarks of retnet-hf against what users would pick instead, each measured side by side in one run.

Not installed with the package: run from the repository root, `python -m benchmarks.<name> --help`."""
