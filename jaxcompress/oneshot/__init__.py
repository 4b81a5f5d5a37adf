"""One-shot compression of a layer from calibration inputs: SparseGPT, Wanda, AWQ, SmoothQuant.

Each function takes one Dense kernel ``w (in, out)`` and the layer's
calibration inputs ``x (..., in)`` (every leading axis is a sample), checks
them (shapes, float dtypes, NaN/inf, settings; errors name ``path``), and
returns the compressed kernel in place of ``w``:

- ``magnitude(w, sparsity= | n_m=)``: keep the largest ``|W_ij|`` (baseline);
- ``wanda(w, x, sparsity= | n_m=)``: keep the largest ``|W_ij| * ||X_i||``
  within each output;
- ``sparsegpt(w, x, sparsity= | n_m=, bits=)``: prune (and optionally
  quantize) with OBS error compensation;
- ``awq(w, x, bits=, group_size=)``: activation-aware scales before group-wise
  round to nearest;
- ``smoothquant(w, x, alpha=)``: move activation outliers into the weights;
  ``w8a8_matmul`` simulates the int8 layer.

``sequential(model, batches, compress)`` runs any of them (or GPTQ) over a
whole model block by block: each block's kernels are compressed from the
inputs the already compressed blocks before it give.

GPTQ is ``jc.quant.gptq``. The statistics (Hessians, norms, maxima) are
reduced under ``jit``, so ``x`` may be sharded over its samples.
"""

from jaxcompress.oneshot.awq import AWQResult, awq
from jaxcompress.oneshot.common import Pruned
from jaxcompress.oneshot.prune import magnitude, wanda
from jaxcompress.oneshot.sequential import sequential
from jaxcompress.oneshot.smoothquant import Smoothed, smoothquant, w8a8_matmul
from jaxcompress.oneshot.sparsegpt import sparsegpt

__all__ = [
    "AWQResult",
    "Pruned",
    "Smoothed",
    "awq",
    "magnitude",
    "sequential",
    "smoothquant",
    "sparsegpt",
    "w8a8_matmul",
    "wanda",
]
