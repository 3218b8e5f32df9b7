"""Counter-based draws: splitmix64 as published, and the values runs depend on to resume."""

import numpy as np

from fitscale.seeds import GOLDEN_GAMMA, MASK64, image_seed, mix64, sample_uniform, sample_uniforms


def test_mix64_is_splitmix64():
    # The first outputs of Vigna's splitmix64.c seeded with 0: next() adds GOLDEN_GAMMA, then mixes.
    outputs = [mix64(k * GOLDEN_GAMMA & MASK64) for k in (1, 2, 3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_draws_keep_the_values_runs_were_trained_with():
    # A resumed run must see the noise and variants an uninterrupted one saw: these values pin them.
    assert [image_seed(*a) for a in [(0, 0, 0), (1, 2, 3), (2**40, 7, 123456789), (-1, 5, 9)]] == [
        2558736989570252433,
        5797055558538453683,
        4085727380825150770,
        7274169014323890152,
    ]
    assert sample_uniform(3, 1, 7, 1) == 0.5118192735341699
    assert sample_uniform(12345, 9, 99999, 2) == 0.8528472020279939


def test_array_draws_equal_one_by_one_draws():
    samples = np.array([0, 1, 7, 2**40, 123456789, 5])
    for seed, epoch, purpose in [(0, 0, 0), (3, 1, 1), (2**33, 17, 2)]:
        expected = [sample_uniform(seed, epoch, int(s), purpose) for s in samples]
        assert sample_uniforms(seed, epoch, samples, purpose).tolist() == expected
