#!/usr/bin/env python3
"""Benchmarks with lm-evaluation-harness: `./evaluate.py --model xlab --model_args checkpoint=CKPT --tasks hellaswag`
(lm-eval's own command line, with XLab's model registered; see xlab/harness.py)."""

import sys

try:
    from xlab.harness import main
except ModuleNotFoundError as err:
    if err.name != "lm_eval":
        raise
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    main()
