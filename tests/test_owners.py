"""The ownership rule: which images are claimed whole, which are spread, and who finishes them."""

from __future__ import annotations

import pytest

from tilerun.owners import assign, claim_order


def test_one_process_claims_every_image_whole_in_input_order():
    own = assign([4, 256, 1, 9], 1)
    assert own.whole == (0, 1, 2, 3) and own.spread == {}


def test_a_folder_of_equal_photos_is_claimed_whole():
    own = assign([4] * 16, 4)  # 16 photos of 1024^2 at tile 512
    assert sorted(own.whole) == list(range(16)) and own.spread == {}


def test_a_lone_big_image_is_spread_and_finished_by_the_last_rank():
    own = assign([256], 4)
    assert own.whole == () and own.spread == {0: 3}
    assert own.finisher(0) == 3


def test_a_big_image_among_small_ones_is_spread_the_small_ones_whole():
    own = assign([4] * 16 + [256], 4)
    assert own.spread == {16: 3}
    assert sorted(own.whole) == list(range(16))
    assert claim_order(own)[0] == ("spread", 16)  # every process starts on it


def test_fewer_images_than_processes_spreads_all_but_one_tile_images():
    own = assign([1, 9, 4], 4)
    assert own.whole == (0,) and set(own.spread) == {1, 2}


def test_limit_is_a_quarter_of_a_process_share():
    # total 100 tiles, 2 processes: whole up to 100 / 8 = 12.5 tiles
    counts = [60, 13, 12] + [1] * 15  # whole: 60 vs 40, 17% idle
    own = assign(counts, 2)
    assert set(own.spread) == {0, 1} and 2 in own.whole


def test_images_that_balance_whole_are_not_spread():
    assert assign([4, 4, 4, 4], 2).spread == {}  # 2 each: nothing to gain
    assert assign([12, 13] + [1] * 75, 2).spread == {}  # the ones fill the gap
    assert set(assign([16] * 5, 2).spread) == set(range(5))  # 3 vs 2 whole: 17% idle
    assert set(assign([30, 1, 1, 1], 2).spread) == {0}


def test_finishers_balance_pixels_and_spare_rank_0():
    own = assign([64, 64, 64, 64, 16], 2, pixels=[64, 64, 64, 64, 16])
    # n >= world, every image is > 272 / 8 = 34 tiles except the last
    assert list(own.spread.items()) == [(0, 1), (1, 0), (2, 1), (3, 0)]
    assert own.whole == (4,)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_image_has_exactly_one_place(world):
    counts = [1, 2, 3, 50, 7, 7, 7, 200, 1, 30]
    own = assign(counts, world)
    assert sorted(list(own.whole) + list(own.spread)) == list(range(len(counts)))
    assert all(0 <= r < world for r in own.spread.values())
    assert own.whole == tuple(sorted(own.whole, key=lambda i: -counts[i]))  # largest first
    assert assign(counts, world) == own  # deterministic


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        assign([1], 0)
