"""``python -m megatron_capaware.launch SCRIPT.py ARGS...``: alias of :mod:`megatron_capaware.megatron_lm.launch`."""

import sys

from megatron_capaware.megatron_lm.launch import main

if __name__ == "__main__":
    sys.exit(main())
