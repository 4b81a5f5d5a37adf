"""Export: a compressed model as real low-bit arrays, in a file, and back.

``export(spec, trainable, state)`` turns the simulated compression of training
into stored arrays (packed int8/int4/int2/int3 codes and float8 with their
scales, N:M positions, bit masks or CSR indices of pruned weights, codebooks
with packed or Huffman-coded indices, low-rank factors), with a manifest.
``save``/``load`` write and read one safetensors file (or an Orbax
directory), checked on load; ``decode`` gives back exactly
``spec.apply(trainable, state)``.

    artifact = jc.export.export(spec, trainable, state, huffman=True)
    print(artifact)                                  # the size table
    jc.export.save(artifact, "model.safetensors")
    params = jc.export.decode(jc.export.load("model.safetensors", like=params))

Compressed inference runs the unchanged model on the stored codes:
``serving_params`` with ``compressed_dense()`` (linen), ``serving_nnx`` (NNX);
``impl="pallas"`` opts in to a Pallas GPU kernel (``pallas_matmul``).
"""

from __future__ import annotations

from jaxcompress.export.artifact import (
    FORMAT_VERSION,
    Artifact,
    EncodedLeaf,
    LeafRecord,
    check,
    decode,
    export,
)
from jaxcompress.export.encodings import (
    Clustered,
    EncodeContext,
    Encoding,
    Factorized,
    Plain,
    Quantized,
    register_encoder,
)
from jaxcompress.export.files import SavedFile, load, read_manifest, save
from jaxcompress.export.inference import (
    CodebookKernel,
    IntKernel,
    LowRankKernel,
    compressed_dense,
    compressed_matmul,
    int8_matmul,
    serving_kernel,
    serving_params,
)
from jaxcompress.export.nnx_inference import CompressedLinear, serving_nnx
from jaxcompress.export.pallas import pallas_matmul

__all__ = [
    "Artifact",
    "Clustered",
    "CodebookKernel",
    "CompressedLinear",
    "EncodeContext",
    "EncodedLeaf",
    "Encoding",
    "FORMAT_VERSION",
    "Factorized",
    "IntKernel",
    "LeafRecord",
    "LowRankKernel",
    "Plain",
    "Quantized",
    "SavedFile",
    "check",
    "compressed_dense",
    "compressed_matmul",
    "decode",
    "export",
    "int8_matmul",
    "load",
    "pallas_matmul",
    "read_manifest",
    "register_encoder",
    "save",
    "serving_kernel",
    "serving_nnx",
    "serving_params",
]
