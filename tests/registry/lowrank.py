from jaxcompress import lowrank
from tests.registry import Case

CASES = [
    Case("lowrank_svd_fixed", lambda: [lowrank.svd(rank=4)]),
    Case("lowrank_svd_fraction", lambda: [lowrank.svd(fraction=0.5)]),
    Case("lowrank_svd_per_leaf", lambda: [lowrank.svd(rank={"Dense_0/kernel": 3, "Dense_1/kernel": 5})]),
]
