"""``python -m megatron_capaware.generate``: alias of :mod:`megatron_capaware.megatron_lm.generate` (``capaware-generate``)."""

import sys

from megatron_capaware.megatron_lm.generate import main

if __name__ == "__main__":
    sys.exit(main())
