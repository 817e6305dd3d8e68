"""`python -m ldm.app`: start the web UI (flags: `python -m ldm.app --help`)."""
import sys

from .cli import main

main(sys.argv[1:])
