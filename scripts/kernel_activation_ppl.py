"""What the CUDA batch-1 kernel's activation rounding costs in perplexity, emulated on the CPU: every
QuantizedLinear's input rows are rounded the way trident/native/gemv_cuda.cu rounds them (per block of 32, two int8
stages for int8 codes, one for int4: gemv_cuda.ACTIVATION_STAGES; ``--stages 2`` rounds int4's with two as well,
``--stages 0`` not at all) before the layer runs, then `trident eval ppl` runs with the remaining arguments:

    python scripts/kernel_activation_ppl.py --stages kernel eval ppl DIR --text shakespeare --window 512 \\
        --max-tokens 4096 --dtype float32
"""
import sys

from trident.cli import main
from trident.native.gemv_cuda import ACTIVATION_STAGES, quantize_activations_reference
from trident.quant.linear import QuantizedLinear

if len(sys.argv) < 3 or sys.argv[1] != "--stages" or sys.argv[2] not in ("kernel", "0", "2"):
    sys.exit(__doc__)
choice = sys.argv[2]
plain_forward = QuantizedLinear.forward


def forward(self, x):
    if choice != "0":
        stages = ACTIVATION_STAGES[self.affine_weight().bits] if choice == "kernel" else 2
        x = quantize_activations_reference(x, stages).to(x.dtype)
    return plain_forward(self, x)


QuantizedLinear.forward = forward
sys.exit(main(sys.argv[3:]))
