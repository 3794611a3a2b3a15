"""The coarse-to-fine schedule: sizes √2 apart, equal compute per scale."""

from nst_core import StyleParams
from nst_core.schedule import scale_sizes, split_budget


def test_split_budget_gives_each_scale_the_same_compute():
    assert split_budget(300, [10_000, 20_000, 40_000]) == [171, 85, 44]
    assert split_budget(7, [1, 2, 4]) == [4, 2, 1]
    assert split_budget(2, [1, 2, 4]) == [0, 0, 2]  # iterations stays an upper bound
    assert split_budget(5, [1, 2, 4]) == [2, 0, 3]  # one evaluation at a scale would change nothing
    assert split_budget(300, [5]) == [300]


def test_scale_sizes_step_by_root_two_up_to_the_image_size():
    assert scale_sizes(StyleParams(image_size=512, scales=3)) == [256, 362, 512]
    assert scale_sizes(StyleParams(image_size=384, scales=1)) == [384]
