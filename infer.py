#!/usr/bin/env python3
"""Generate text from a checkpoint: `./infer.py CKPT "PROMPT"` (see --help)."""

import sys

from xlab.infer import main

if __name__ == "__main__":
    sys.exit(main())
