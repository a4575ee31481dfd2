"""Near-copies of private images over the whole private set, chunked search, and the pairs PNG."""

from __future__ import annotations

import pytest
import torch

from ddcore.data import DataSplits
from ddcore.summary import Summary
from privacy.attacks.memorisation import closest_pairs, memorisation, near_copy_threshold, save_closest_pairs
from privacy.attacks.metrics import ssim
from privacy.attacks.nearest import nearest_l2, nearest_ssim
from privacy.audit import memorisation_audit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spread(digits) -> torch.Tensor:
    """Indices spread over the whole private set, its last image included."""
    n = len(digits.train)
    return torch.tensor([0, n // 3, n // 2, n - 2, n - 1])


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 10)])
def test_the_batched_ssim_search_equals_ssim_pair_by_pair(shape) -> None:
    g = torch.Generator().manual_seed(0)
    queries, refs = torch.rand((11, *shape), generator=g), torch.rand((40, *shape), generator=g)
    refs[7] = queries[3]  # a copy scores 1
    s, i = nearest_ssim(queries, refs, query_block=4, block_elements=3000)  # several blocks each way
    pairwise = torch.stack([ssim(q[None], refs) for q in queries])  # (11, 40), the reference formula
    assert torch.equal(i, pairwise.argmax(1)) and torch.allclose(s, pairwise.max(1).values, atol=1e-5)
    assert i[3] == 7 and s[3] == pytest.approx(1.0, abs=1e-5)


def test_the_chunked_search_equals_a_full_distance_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    queries, refs = torch.randn((13, 1, 4, 4), generator=g), torch.randn((50, 1, 4, 4), generator=g)
    d, i = nearest_l2(queries, refs, query_chunk=3, ref_chunk=7)
    full = torch.cdist(queries.flatten(1), refs.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d, full.min(1).values, atol=1e-5)
    # a query that is a reference finds itself, unless excluded; then its true runner-up
    d, i = nearest_l2(refs[:5], refs, exclude=torch.arange(5), query_chunk=2, ref_chunk=4)
    full = torch.cdist(refs[:5].flatten(1), refs.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    full[torch.arange(5), torch.arange(5)] = float("inf")
    assert torch.equal(i, full.argmin(1)) and torch.all(d > 0)


def test_the_threshold_is_a_small_positive_real_to_real_distance(digits) -> None:
    threshold = near_copy_threshold(digits.train)
    # self-matches excluded (else 0); below the median private nearest-neighbour distance
    d, _ = nearest_l2(digits.train.x[:200], digits.train.x, exclude=torch.arange(200),
                      transform=lambda x: digits.train.denormalise(x).clamp(0, 1))
    assert 0 < threshold < float(d.median())


def test_a_summary_of_copies_is_all_near_copies_wherever_they_sit(digits, spread) -> None:
    private = digits.train
    result = memorisation(private.x[spread], private, digits.test, max_reference=50)
    assert result.near_copy_fraction == 1.0 and result.l2_nearest_private[-1] == 0.0
    assert result.num_private == len(private) and result.num_heldout == len(digits.test)
    pairs = closest_pairs(private.x[spread], private, k=len(spread))
    assert sorted(p["private"] for p in pairs) == spread.tolist()


def test_slightly_perturbed_copies_still_count(digits, spread) -> None:
    private = digits.train
    g = torch.Generator().manual_seed(2)
    pixels = private.denormalise(private.x[spread]) + 0.02 * torch.randn((len(spread), 1, 8, 8), generator=g)
    perturbed = (pixels - private.mean[0]) / private.std[0]
    result = memorisation(perturbed, private, digits.test)
    assert result.near_copy_fraction == 1.0 and 0 < result.l2_nearest_private[-1] < result.near_copy_threshold


def test_noise_and_unseen_images_are_not_near_copies(digits) -> None:
    private = digits.train
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand((40, 1, 8, 8), generator=g) - private.mean[0]) / private.std[0]
    assert memorisation(noise, private, digits.test).near_copy_fraction == 0.0
    unseen = memorisation(digits.test.x[:60], private, digits.test.subset(torch.arange(60, len(digits.test))))
    assert unseen.near_copy_fraction <= 0.05, unseen


def test_the_closest_pairs_png_is_written(digits, spread, tmp_path) -> None:
    path = tmp_path / "pairs" / "closest.png"
    g = torch.Generator().manual_seed(3)
    summary = torch.cat([digits.train.x[spread[:2]], torch.randn((6, 1, 8, 8), generator=g)])
    pairs = save_closest_pairs(summary, digits.train, path, k=4, threshold=0.5, title="test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert [p["l2"] for p in pairs[:2]] == [0.0, 0.0] and len(pairs) == 4
    assert {p["synthetic"] for p in pairs[:2]} == {0, 1}


def test_the_audit_dict_carries_the_near_copy_fraction(digits, spread) -> None:
    pooled = Summary(digits.train.x[spread], digits.train.y[spread])
    out = memorisation_audit(pooled, DataSplits(digits.train, digits.test), seed=0)
    assert out["near_copy_fraction"] == 1.0 and out["num_private"] == len(digits.train)
