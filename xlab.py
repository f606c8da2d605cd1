#!/usr/bin/env python3
"""Train, validate, test and predict: `./xlab.py fit -c conf/xlab.yaml`."""

from xlab.cli import main

if __name__ == "__main__":
    main()
