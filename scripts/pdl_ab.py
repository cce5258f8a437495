"""A/B of programmatic dependent launch: `trident bench` ARGS with PDL on (as shipped on Hopper) and off.
Run on the GPU machine: python scripts/pdl_ab.py off|on bench latency --shape llama3-8b ... (one mode per
process, so each compiles and captures its own kernels)."""
import sys

import trident.kernels.pdl as pdl
from trident.cli import main

mode, args = sys.argv[1], sys.argv[2:]
if mode == "off":
    pdl._capable = lambda index: False
sys.exit(main(args))
