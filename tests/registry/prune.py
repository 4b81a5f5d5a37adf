import jaxcompress as jc
from tests.registry import Case

CASES = [
    Case("prune_magnitude", lambda: [jc.prune.magnitude(sparsity=jc.schedules.linear(0.0, 0.8, end_step=4))]),
    Case(
        "prune_magnitude_global",
        lambda: [jc.prune.magnitude(sparsity=0.7, distribution=jc.prune.Global())],
    ),
    Case("prune_straight_through", lambda: [jc.prune.magnitude(sparsity=0.5, straight_through=True)]),
]
