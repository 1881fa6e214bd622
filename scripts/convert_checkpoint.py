"""Convert a RetNet checkpoint (torchscale/fairseq, syncdoth-format or fla) into a retnet-hf folder.

Same as `retnet-hf convert`: python scripts/convert_checkpoint.py --from {torchscale,syncdoth,fla} SRC OUT
"""

import sys

from retnet_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
