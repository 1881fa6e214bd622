#!/usr/bin/env python
"""Fine-tune a RetNet folder on guanaco-style chat data: a thin entry for `retnet-hf sft` (see its --help)."""

import sys

from retnet_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
