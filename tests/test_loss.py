"""LocalizedRegionContrastLoss against an obviously-correct loop reference, and its limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lrc_lightning import DenseProjectionHead, LocalizedRegionContrastLoss
from lrc_lightning.objective.regions import (
    _id_counts,
    downsample_superpixels,
    region_embeddings,
    select_regions,
)


def reference_loss(f1, f2, s1, s2, ids, valid, tau, same_view_negatives=False):
    """Slow loops: masked average pooling per region, InfoNCE per anchor, both directions."""
    b = f1.shape[0]  # any number of spatial dims: masks index (D, *spatial) embeddings
    e1, e2 = F.normalize(f1, dim=1), F.normalize(f2, dim=1)
    z1, z2, keep = [], [], []
    for i in range(b):
        for n in range(ids.shape[1]):
            if not valid[i, n]:
                continue
            r = ids[i, n]
            m1, m2 = s1[i] == r, s2[i] == r
            z1.append(F.normalize(e1[i][:, m1].mean(1), dim=0))
            z2.append(F.normalize(e2[i][:, m2].mean(1), dim=0))
            keep.append(True)
    z1, z2 = torch.stack(z1), torch.stack(z2)

    def one_way(a, c):
        total = 0.0
        for i in range(len(a)):
            logits = [torch.dot(a[i], c[j]) / tau for j in range(len(c))]
            if same_view_negatives:
                logits += [torch.dot(a[i], a[j]) / tau for j in range(len(a)) if j != i]
            logits = torch.stack(logits)
            total = total - (logits[i] - torch.logsumexp(logits, 0))
        return total / len(a)

    return 0.5 * (one_way(z1, z2) + one_way(z2, z1))


def _maps(seed: int, b=3, size=16, k=7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, k, (b, size // 4, size // 4), generator=g)
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)


@pytest.mark.parametrize("same_view", [False, True])
def test_matches_loop_reference(same_view: bool) -> None:
    torch.manual_seed(0)
    f1 = torch.randn(3, 8, 16, 16, dtype=torch.float64)
    f2 = torch.randn(3, 8, 16, 16, dtype=torch.float64)
    s1 = _maps(1)
    s2 = s1.clone()
    s2[:, :4] = -1  # view 2 lost some regions (e.g. cropped away)
    loss_fn = LocalizedRegionContrastLoss(
        temperature=0.2,
        num_regions=5,
        samples_per_region=None,
        min_pixels=1,
        negatives_from_same_view=same_view,
    )
    loss = loss_fn.contrast(
        *loss_fn.region_embeddings(f1, f2, s1, s2, torch.Generator().manual_seed(3))
    )
    # The loss bounds the ids by the maps' pixel count (16 x 16).
    ids, valid = select_regions(s1, s2, 5, 1, torch.Generator().manual_seed(3), num_ids=256)
    ref = reference_loss(f1.float(), f2.float(), s1, s2, ids, valid, 0.2, same_view)
    assert valid.sum() > 6
    assert torch.allclose(loss.float(), ref, atol=1e-5), (loss, ref)


def _paint(vectors: torch.Tensor, maps: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, K, C) vectors, (B, H, W) ids -> (B, C, H, W): each pixel carries its region's
    vector; pixels with id -1 get noise (they must never be read)."""
    painted = torch.stack([v[m.clamp(min=0)] for v, m in zip(vectors, maps, strict=True)])
    noise = torch.randn(painted.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where((maps >= 0).unsqueeze(-1), painted, noise).permute(0, 3, 1, 2)


@pytest.mark.parametrize("samples", [5, None])
def test_each_view_is_read_at_its_own_region_positions(samples) -> None:
    """The correspondence at the heart of LRC: view 2 is a flipped, shifted and partly
    cropped copy of view 1, so its regions lie elsewhere, and its features follow its map.
    With one vector per region and view, each region embedding is known by hand whatever
    pixels are drawn; reading view 2 at view 1's positions gives other regions' vectors."""
    k, tau = 7, 0.2
    s1 = _maps(12, b=2, size=16, k=k)
    s2 = s1.flip(-1).roll(4, dims=-2)
    s2[:, :3] = -1
    assert (s1 != s2).float().mean() > 0.5  # the maps really differ
    g = torch.Generator().manual_seed(11)
    a, c = torch.randn(2, k, 6, generator=g), torch.randn(2, k, 6, generator=g)
    f1, f2 = _paint(a, s1, 1), _paint(c, s2, 2)
    loss_fn = LocalizedRegionContrastLoss(temperature=tau, num_regions=5,
                                          samples_per_region=samples, min_pixels=1)  # fmt: skip
    z1, z2, valid = loss_fn.region_embeddings(f1, f2, s1, s2, torch.Generator().manual_seed(3))
    ids, valid_ref = select_regions(s1, s2, 5, 1, torch.Generator().manual_seed(3), num_ids=256)
    assert torch.equal(valid, valid_ref) and valid.sum() >= 8
    expected_1, expected_2 = torch.zeros_like(z1), torch.zeros_like(z2)
    for i in range(2):
        for n in range(5):
            if valid[i, n]:
                expected_1[i, n] = F.normalize(a[i, ids[i, n]], dim=0)
                expected_2[i, n] = F.normalize(c[i, ids[i, n]], dim=0)
    torch.testing.assert_close(z1, expected_1)
    torch.testing.assert_close(z2, expected_2)
    ref = reference_loss(f1, f2, s1, s2, ids, valid, tau)
    torch.testing.assert_close(loss_fn.contrast(z1, z2, valid), ref, atol=1e-5, rtol=1e-5)


def test_forward_equals_region_embeddings_then_contrast() -> None:
    torch.manual_seed(1)
    f1, f2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s = _maps(2, b=2, size=8, k=4)
    loss_fn = LocalizedRegionContrastLoss(num_regions=4, samples_per_region=3, min_pixels=1)
    a = loss_fn(f1, f2, s, s, generator=torch.Generator().manual_seed(5))
    z = loss_fn.region_embeddings(f1, f2, s, s, torch.Generator().manual_seed(5))
    assert torch.allclose(a, loss_fn.contrast(*z))


def test_invariant_to_permuting_region_ids() -> None:
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    s = _maps(4, b=2, k=6)
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    loss_fn = LocalizedRegionContrastLoss(num_regions=16, samples_per_region=None, min_pixels=1)
    # With N >= K every region is used, so the draw order does not matter.
    a = loss_fn(f1, f2, s, s)
    b = loss_fn(f1, f2, perm[s], perm[s])
    assert torch.allclose(a, b, atol=1e-6)


def test_identical_views_with_orthogonal_region_embeddings_reach_lower_bound() -> None:
    k, tau = 6, 0.05
    s = _maps(5, b=2, k=k)
    # Region-constant embeddings: pixel embedding = one-hot of its region id.
    f = F.one_hot(s, 8).permute(0, 3, 1, 2).float()
    loss_fn = LocalizedRegionContrastLoss(
        temperature=tau, num_regions=k, samples_per_region=4, min_pixels=1
    )
    z1, z2, valid = loss_fn.region_embeddings(f, f, s, s)
    loss = loss_fn.contrast(z1, z2, valid)
    # Each anchor: positive logit 1/tau; the other regions of its own image are orthogonal
    # (logit 0), the same regions of the other image are identical (logit 1/tau).
    n_valid = valid.sum(1)
    expected = []
    for i in range(2):
        for n in range(k):
            if not valid[i, n]:
                continue
            same_id = int(sum(((z2[j] * z1[i, n]).sum(-1) > 0.99).sum() for j in range(2)))
            others = int(valid.sum()) - same_id
            expected.append(math.log(same_id + others * math.exp(-1 / tau)))
    assert n_valid.min() >= 3
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert loss.item() < math.log(2) + 1e-3  # at most one indistinguishable twin per anchor


def test_random_embeddings_give_log_of_candidates() -> None:
    torch.manual_seed(0)
    b, k = 4, 8
    s = _maps(6, b=b, size=32, k=k)
    f1, f2 = torch.randn(b, 4096, 8, 8), torch.randn(b, 4096, 8, 8)
    loss_fn = LocalizedRegionContrastLoss(
        temperature=1.0, num_regions=k, samples_per_region=2, min_pixels=1
    )
    _, _, valid = loss_fn.region_embeddings(f1, f2, s, s)
    loss = loss_fn(f1, f2, s, s)
    assert loss.item() == pytest.approx(math.log(valid.sum().item()), abs=0.05)


def test_gradcheck_through_pooling_and_sampling() -> None:
    torch.manual_seed(0)
    s = _maps(7, b=2, size=8, k=4)
    for m in (None, 3):
        loss_fn = LocalizedRegionContrastLoss(
            temperature=0.5, num_regions=4, samples_per_region=m, min_pixels=1
        )
        f1 = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        f2 = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

        def fn(a, b, loss_fn=loss_fn):
            z = loss_fn.region_embeddings(a, b, s, s, torch.Generator().manual_seed(0))
            # region_embeddings casts to fp32 for autocast safety; recompute in fp64 here.
            return loss_fn.contrast(*z)

        # fp32 inside: compare the analytic gradient with finite differences loosely.
        assert torch.autograd.gradcheck(
            lambda a, b: fn(a, b).double(), (f1, f2), eps=1e-3, atol=2e-2, rtol=2e-2
        )


def test_sampled_pixels_stay_inside_their_region() -> None:
    s = _maps(8, b=3, size=16, k=9)
    f = F.one_hot(s, 9).permute(0, 3, 1, 2).float()
    ids, valid = select_regions(s, s, 9, 1)
    z = region_embeddings(f, s, ids, valid, samples_per_region=5)
    expected = F.one_hot(ids, 9).float() * valid.unsqueeze(-1)
    assert torch.allclose(z, expected)


def test_missing_regions_single_region_and_all_ignored() -> None:
    torch.manual_seed(0)
    f1, f2 = torch.randn(3, 4, 8, 8, requires_grad=True), torch.randn(3, 4, 8, 8)
    s1 = torch.zeros(3, 8, 8, dtype=torch.long)
    s1[0, :, 4:] = 1  # image 0: two regions
    s1[2] = -1  # image 2: everything ignored
    s2 = s1.clone()
    s2[0, :, 4:] = 5  # region 1 missing from view 2, region 5 missing from view 1
    loss_fn = LocalizedRegionContrastLoss(num_regions=4, samples_per_region=4, min_pixels=1)
    _, _, valid = loss_fn.region_embeddings(f1, f2, s1, s2)
    assert valid.sum(1).tolist() == [1, 1, 0]  # only id 0 is shared in image 0 and 1
    loss = loss_fn(f1, f2, s1, s2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f1.grad).all()
    # Nothing valid anywhere: zero loss, zero (finite) gradient, graph intact.
    f1.grad = None
    empty = loss_fn(f1, f2, torch.full_like(s1, -1), torch.full_like(s1, -1))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(f1.grad) == 0


def test_min_pixels_excludes_small_regions() -> None:
    s = torch.zeros(1, 8, 8, dtype=torch.long)
    s[0, 0, 0] = 1  # a one-pixel region
    ids, valid = select_regions(s, s, 4, min_pixels=2)
    assert set(ids[valid].tolist()) == {0}


def test_downsample_nearest_and_majority() -> None:
    maps = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 1], [3, 3, -1, -1], [3, 4, -1, 2]]])
    near = downsample_superpixels(maps, (2, 2), "nearest")
    assert near.tolist() == [[[2, 1], [4, 2]]]  # pixel centres (1, 1), (1, 3), (3, 1), (3, 3)
    major = downsample_superpixels(maps, (2, 2), "majority")
    assert major.tolist() == [[[0, 1], [3, 2]]]  # -1 never wins against a real id
    allign = downsample_superpixels(torch.full((1, 4, 4), -1), (2, 2), "majority")
    assert (allign == -1).all()
    with pytest.raises(ValueError, match="integer factors"):
        downsample_superpixels(maps, (3, 3), "majority")
    assert downsample_superpixels(maps, (3, 3), "nearest").shape == (1, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0}, "temperature"),
        ({"num_regions": 0}, "num_regions"),
        ({"samples_per_region": 0}, "samples_per_region"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"downsample": "bilinear"}, "downsample"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LocalizedRegionContrastLoss(**kwargs)


def test_bad_inputs_get_clear_errors() -> None:
    loss_fn = LocalizedRegionContrastLoss()
    f = torch.randn(2, 4, 8, 8)
    s = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="B=2"):
        loss_fn(f, f, s[:1], s)
    with pytest.raises(TypeError, match="integer"):
        loss_fn(f, f, s.float(), s)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        loss_fn(f, f[:, :2], s, s)


def test_fixed_shapes_and_fp32_under_autocast() -> None:
    f = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    s = _maps(9, b=2, size=8, k=3)
    loss_fn = LocalizedRegionContrastLoss(num_regions=10, min_pixels=1)
    z1, z2, valid = loss_fn.region_embeddings(f, f, s, s)
    assert z1.shape == z2.shape == (2, 10, 4) and valid.shape == (2, 10)
    assert valid.sum(1).max() <= 3  # padded slots are invalid
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(f, f, s, s)
    assert loss.dtype == torch.float32


def test_deterministic_under_seed() -> None:
    f1, f2 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    s = _maps(10, b=2, k=9)
    loss_fn = LocalizedRegionContrastLoss(num_regions=4, samples_per_region=3, min_pixels=1)
    torch.manual_seed(123)
    a = loss_fn(f1, f2, s, s)
    torch.manual_seed(123)
    b = loss_fn(f1, f2, s, s)
    torch.manual_seed(124)
    c = loss_fn(f1, f2, s, s)
    assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.parametrize("samples", [8, None])
def test_projecting_only_the_sampled_pixels_equals_projecting_the_map(samples) -> None:
    """The head runs on the N x M samples, not the (B, C, h, w) map: the same loss when its
    BatchNorm uses fixed statistics (eval), since a 1x1 head acts on each pixel alone."""
    from lrc_lightning import DenseProjectionHead

    torch.manual_seed(0)
    features = torch.randn(2, 2, 6, 16, 16)
    maps = torch.randint(0, 5, (2, 2, 16, 16))
    head = DenseProjectionHead(6, 12, 8).eval()
    loss = LocalizedRegionContrastLoss(num_regions=4, samples_per_region=samples)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    on_samples = loss(features[0], features[1], maps[0], maps[1], g1, projector=head)
    with torch.no_grad():
        embedded = head(features.flatten(0, 1)).unflatten(0, (2, 2))
    on_map = loss(embedded[0], embedded[1], maps[0], maps[1], g2)
    torch.testing.assert_close(on_samples, on_map)


def test_head_statistics_ignore_masked_samples() -> None:
    """Values at masked positions change neither the head's outputs at valid positions nor
    its running statistics."""
    from lrc_lightning import DenseProjectionHead

    torch.manual_seed(0)
    head = DenseProjectionHead(6, out_channels=5).train()
    x = torch.randn(4, 6, 10, 1)
    mask = torch.zeros(4, 10, 1, dtype=torch.bool)
    mask[:, :4] = True
    other = x.clone()
    other[:, :, 4:] = torch.randn(4, 6, 6, 1) * 10 + 5  # garbage where the mask is False
    out = head(x, mask)
    stats = head.layers[1].running_mean.clone()
    head.layers[1].reset_running_stats()
    out_other = head(other, mask)
    torch.testing.assert_close(out[:, :, :4], out_other[:, :, :4])
    torch.testing.assert_close(head.layers[1].running_mean, stats)
    # The statistics are those of the valid positions: equal to a head run on them alone.
    alone = DenseProjectionHead(6, out_channels=5).train()
    alone.load_state_dict(head.state_dict())
    torch.testing.assert_close(alone(x[:, :, :4]), out[:, :, :4])


def test_ignored_pixels_get_no_gradient_through_the_head() -> None:
    """Pixels with id -1 (and pixels of no drawn region) receive exactly zero gradient: empty
    slots' samples no longer reach the head's BatchNorm statistics."""
    from lrc_lightning import DenseProjectionHead

    torch.manual_seed(0)
    maps = torch.full((2, 16, 16), -1, dtype=torch.long)
    maps[:, :8, :8] = 0  # one real region per image: most of the N slots stay empty
    maps[:, 8:, :8] = 1
    f1 = torch.randn(2, 6, 16, 16, requires_grad=True)
    f2 = torch.randn(2, 6, 16, 16, requires_grad=True)
    loss_fn = LocalizedRegionContrastLoss(num_regions=8, samples_per_region=4, min_pixels=1)
    head = DenseProjectionHead(6, out_channels=8).train()
    loss = loss_fn(f1, f2, maps, maps, projector=head)
    loss.backward()
    for f in (f1, f2):
        ignored = (maps < 0).unsqueeze(1).expand_as(f)
        assert f.grad[ignored].abs().max() == 0
        assert f.grad[~ignored].abs().sum() > 0


def test_bounded_and_sorted_region_selection_agree_and_bad_ids_are_refused() -> None:
    """Both ways of counting regions find the same eligible ids (all drawn when the slots
    outnumber them); an id beyond the bound is an error, not a silent miscount."""
    s1, s2 = _maps(4, b=3, size=16, k=9), _maps(5, b=3, size=16, k=9)
    s2[:, :6] = -1
    bounded = select_regions(s1, s2, 40, 3, num_ids=256)
    sorted_ = select_regions(s1, s2, 40, 3)
    for (ids_a, valid_a), (ids_b, valid_b) in [(bounded, sorted_)]:
        for i in range(3):
            assert set(ids_a[i][valid_a[i]].tolist()) == set(ids_b[i][valid_b[i]].tolist())
    assert bounded[1].sum() > 3
    with pytest.raises(ValueError, match=r"superpixels_v1: super-pixel id 30\d is not below 256"):
        select_regions(s1 + 300, s2, 4, 1, num_ids=256)
    # Where the maps are not read back (accelerators), an id beyond the bound is counted
    # nowhere: not clamped onto id 255 (a merge), not out of range (a device assert).
    big = torch.full((1, 4, 4), 255)
    big[0, :2] = 300
    assert _id_counts(big, 256)[0, 255] == 8 and _id_counts(big, 256).sum() == 8


def test_volumes_match_the_loop_reference_through_the_same_code() -> None:
    """(B, C, d, h, w) features with (B, D, H, W) supervoxel maps at twice the resolution."""
    torch.manual_seed(0)
    f1 = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64)
    f2 = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    coarse = torch.randint(0, 6, (2, 2, 2, 2), generator=g)
    s1 = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    s2 = s1.clone()
    s2[:, :2] = -1
    loss_fn = LocalizedRegionContrastLoss(temperature=0.2, num_regions=5,
                                          samples_per_region=None, min_pixels=1)  # fmt: skip
    loss = loss_fn.contrast(
        *loss_fn.region_embeddings(f1, f2, s1, s2, torch.Generator().manual_seed(3))
    )
    m1, m2 = downsample_superpixels(s1, (4, 4, 4)), downsample_superpixels(s2, (4, 4, 4))
    ids, valid = select_regions(m1, m2, 5, 1, torch.Generator().manual_seed(3), num_ids=512)
    ref = reference_loss(f1.float(), f2.float(), m1, m2, ids, valid, 0.2)
    assert valid.sum() >= 6
    assert torch.allclose(loss.float(), ref, atol=1e-5), (loss, ref)
    # Sampled regions and the head take volumes too; gradients reach both views.
    a, b = f1.float().requires_grad_(True), f2.float().requires_grad_(True)
    head = DenseProjectionHead(6, out_channels=8)
    LocalizedRegionContrastLoss(num_regions=5, samples_per_region=4, min_pixels=1)(
        a, b, s1, s2, projector=head
    ).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, D, H, W\)"):
        loss_fn(f1, f2, s1[:, 0], s2[:, 0])


def test_majority_downsampling_of_volumes_takes_each_blocks_most_frequent_id() -> None:
    maps = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    maps[0, :2, :2, :2] = 3
    maps[0, 0, 0, 0] = 7  # a minority voxel in the first block
    maps[0, 2:, 2:, 2:] = -1
    maps[0, 2, 2, 2] = 5  # one id among -1s wins its block
    out = downsample_superpixels(maps, (2, 2, 2), "majority")
    assert out[0, 0, 0, 0] == 3 and out[0, 1, 1, 1] == 5 and out[0, 1, 0, 0] == 0
    nearest = downsample_superpixels(maps, (2, 2, 2), "nearest")
    assert torch.equal(nearest, maps[:, 1::2, 1::2, 1::2])
