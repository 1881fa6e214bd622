#!/usr/bin/env python
"""Upload a RetNet model folder to the Hugging Face Hub: the same as `retnet-hf push FOLDER REPO_ID [options]`.

python scripts/push_to_hub.py my-retnet your-name/my-retnet --private
"""

import sys

from retnet_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
