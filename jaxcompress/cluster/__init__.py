"""Weight clustering (k-means weight sharing) and entropy-coded size accounting.

``Cluster`` (built with ``kmeans``) shares ``2^b`` trainable centroids per
layer or per output channel; placed after a pruning stage it clusters the
surviving weights only and keeps pruned zeros at zero (Deep Compression:
prune, cluster, fine-tune the centroids, Huffman-code). ``compressed_size``
reports what a model really costs to store, leaf by leaf.
"""

from __future__ import annotations

from jaxcompress.cluster.entropy import huffman_code_lengths, relative_index
from jaxcompress.cluster.report import LeafSize, SizeReport, compressed_size
from jaxcompress.cluster.stage import Cluster, ClusterState, kmeans

__all__ = [
    "Cluster",
    "ClusterState",
    "LeafSize",
    "SizeReport",
    "compressed_size",
    "huffman_code_lengths",
    "kmeans",
    "relative_index",
]
