"""Small real data the package ships (origin, licence and checksums in README.md beside these files): the defaults
of `retnet-hf eval`'s local tasks, the README's examples, the tests and the benchmarks. A non-editable install
carries them; nothing is downloaded."""

from pathlib import Path


FOLDER = Path(__file__).resolve().parent
# Tiny Shakespeare (public domain): its first 399,862 characters, for training
SHAKESPEARE_TRAIN = FOLDER / "tinyshakespeare-train.txt"
# ... and its text after character 1,000,074 (115,320 characters), held out for evaluation
SHAKESPEARE_HELD_OUT = FOLDER / "tinyshakespeare-heldout.txt"
# the first 300 rows of guanaco-llama2-1k (Apache-2.0), chat in the Llama-2 form
GUANACO = FOLDER / "guanaco-llama2-300.parquet"
