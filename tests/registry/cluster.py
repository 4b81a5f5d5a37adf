import jaxcompress as jc
import jaxcompress.cluster  # noqa: F401  (until the top-level package exports it)
from tests.registry import Case

# Once clustered, the dense weight only says which entries are zero: the
# gradient goes to the centroids (and the biases).
_CENTROIDS = r".*/bias|.*/params/.*"

CASES = [
    Case(
        "cluster_per_channel_density",
        lambda: [jc.cluster.kmeans(bits=2, channel_axis=-1, centroid_init="density")],
        trains=_CENTROIDS,
    ),
    Case(
        "prune_then_cluster",
        lambda: [jc.prune.magnitude(sparsity=0.5), jc.cluster.kmeans(bits=3)],
        trains=_CENTROIDS,
    ),
    Case(
        "prune_then_cluster_at_step",
        lambda: [
            jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.75, end_step=2)),
            jc.cluster.kmeans(bits=2, channel_axis=-1, centroid_init="kmeans++", begin_step=2),
        ],
        needs_key=True,
        trains=_CENTROIDS,
    ),
]
