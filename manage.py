#!/usr/bin/env python3
"""Maintenance commands: `./manage.py export-checkpoint CKPT`; `./manage.py --help` lists them all."""

from xlab.manage import main

if __name__ == "__main__":
    main()
