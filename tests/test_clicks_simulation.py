"""Simulated clicks land where a radiologist would put them."""

import numpy as np

from lib.trainers.clicks import correction_click, interior_click


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def test_the_first_click_is_the_deepest_voxel_or_an_interior_one():
    lesion = ball((40, 40, 40), (20, 15, 25), 8)
    assert interior_click(lesion).tolist() == [20, 15, 25]
    rng = np.random.default_rng(0)
    for _ in range(20):
        click = interior_click(lesion, rng)
        assert lesion[tuple(click)]


def test_a_correction_goes_on_the_largest_error_with_its_kind():
    truth = ball((40, 40, 40), (20, 20, 20), 10)
    missed = truth & ~ball((40, 40, 40), (20, 20, 12), 6)  # a small miss at one end
    leak = truth | ball((40, 40, 40), (20, 33, 20), 5)  # a leak outside
    click, kind = correction_click(missed, truth)
    assert kind == 1 and truth[tuple(click)] and not missed[tuple(click)]
    click, kind = correction_click(leak, truth)
    assert kind == 0 and leak[tuple(click)] and not truth[tuple(click)]
    assert correction_click(truth, truth) is None
