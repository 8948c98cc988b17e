"""Latent CutMix (boxes, λ, label mixing, pasting, seam band) and the student augmentation, against hand-made cases."""

from __future__ import annotations

import pytest
import torch

from augment.latent_cutmix import CutMixResult, apply_cutmix, latent_cutmix, mix_labels, sample_boxes, seam_band
from augment.student_augment import random_crop, random_flip, student_augment


def box_mask(height: int, width: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """(1, 1, H, W) bool, True on rows [top, bottom) and cols [left, right)."""
    box = torch.zeros(1, 1, height, width, dtype=torch.bool)
    box[..., top:bottom, left:right] = True
    return box


def as_rows(mask: torch.Tensor) -> list[str]:
    """A (1, 1, H, W) mask as strings, for readable hand-written expectations."""
    return ["".join("#" if v else "." for v in row) for row in mask[0, 0].tolist()]


# --- boxes and λ -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,beta", [(8, 8, 1.0), (5, 11, 0.5), (16, 16, 2.0)])
def test_boxes_are_rectangles_inside_the_map_and_lam_is_exact(height, width, beta):
    generator = torch.Generator().manual_seed(0)
    box, lam = sample_boxes(64, height, width, beta, generator)
    assert box.shape == (64, 1, height, width) and box.dtype == torch.bool
    for i in range(64):
        rows = box[i, 0].any(1).nonzero().flatten()
        cols = box[i, 0].any(0).nonzero().flatten()
        if len(rows):  # a filled axis-aligned rectangle (clipped at the border, never wrapped around)
            assert rows.tolist() == list(range(int(rows[0]), int(rows[-1]) + 1))
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))
            assert box[i, 0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        area = box[i].sum().item()
        assert lam[i].item() == pytest.approx(1.0 - area / (height * width), abs=1e-7)  # from the real (clipped) box
    assert (lam >= 0).all() and (lam <= 1).all()
    assert (lam < 1).any() and (lam > 0).any()  # non-trivial boxes occur


def test_cutmix_is_deterministic_under_a_seeded_generator():
    a = latent_cutmix(6, 8, 8, 1.0, torch.Generator().manual_seed(7))
    b = latent_cutmix(6, 8, 8, 1.0, torch.Generator().manual_seed(7))
    c = latent_cutmix(6, 8, 8, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a.perm, b.perm) and torch.equal(a.box, b.box) and torch.equal(a.lam, b.lam)
    assert not (torch.equal(a.box, c.box) and torch.equal(a.perm, c.perm))
    assert sorted(a.perm.tolist()) == list(range(6))  # a permutation: every sample is some box's source once


# --- label mixing and pasting ----------------------------------------------------------------------------------------
def test_mix_labels_is_lam_weighted_sum():
    y = torch.eye(3)  # samples of classes 0, 1, 2
    mix = CutMixResult(perm=torch.tensor([2, 0, 1]), box=torch.zeros(3, 1, 4, 4, dtype=torch.bool),
                       lam=torch.tensor([0.75, 0.5, 1.0]))
    expected = torch.tensor([[0.75, 0.0, 0.25],  # 0.75·y0 + 0.25·y2
                             [0.5, 0.5, 0.0],  # 0.5·y1 + 0.5·y0
                             [0.0, 0.0, 1.0]])  # λ = 1: nothing pasted, label unchanged
    assert torch.allclose(mix_labels(y, mix), expected)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    lam = mix.lam[:, None]
    assert torch.allclose(mix_labels(soft, mix), lam * soft + (1 - lam) * soft[mix.perm])
    assert torch.allclose(mix_labels(soft, mix).sum(1), torch.ones(3))


def test_apply_cutmix_pastes_the_source_pixels_inside_the_box_only():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)  # (B=2, C=2, 4, 4), all values distinct
    box = torch.cat([box_mask(4, 4, 1, 3, 0, 2), box_mask(4, 4, 0, 0, 0, 0)])  # sample 1: empty box
    mix = CutMixResult(perm=torch.tensor([1, 0]), box=box, lam=torch.tensor([0.75, 1.0]))
    out = apply_cutmix(x, mix)
    expected = x.clone()
    expected[0, :, 1:3, 0:2] = x[1, :, 1:3, 0:2]  # every channel of the box comes from sample 1
    assert torch.equal(out, expected)
    assert torch.equal(out[1], x[1])


# --- the seam band -------------------------------------------------------------------------------------------------
def test_seam_band_of_a_centred_box_is_the_ring_on_both_sides_of_the_edge():
    box = box_mask(8, 8, 2, 6, 2, 6)  # 4x4 box, rows/cols 2..5
    assert as_rows(seam_band(box, 1)) == [
        "........",
        ".######.",
        ".######.",
        ".##..##.",
        ".##..##.",
        ".######.",
        ".######.",
        "........",
    ]  # 6x6 dilation minus the 2x2 erosion: 32 pixels, 16 inside the box and 16 outside
    assert seam_band(box, 0).sum() == 0


def test_seam_band_skips_edges_on_the_latent_border():
    box = box_mask(8, 8, 0, 4, 0, 4)  # top-left 4x4 box: its top and left edges are the latent border
    assert as_rows(seam_band(box, 1)) == [
        "...##...",
        "...##...",
        "...##...",
        "#####...",
        "#####...",
        "........",
        "........",
        "........",
    ]
    full = box_mask(8, 8, 0, 8, 0, 8)  # a box covering everything has no seam at all
    assert seam_band(full, 2).sum() == 0


def test_seam_band_width_two_and_batch_independence():
    boxes = torch.cat([box_mask(8, 8, 2, 6, 2, 6), box_mask(8, 8, 0, 0, 0, 0)])
    band = seam_band(boxes, 2)
    assert band.shape == (2, 1, 8, 8)
    assert band[0].sum() == 64  # dilation by 2 reaches the border (8x8), erosion by 2 of a 4x4 box is empty
    assert band[1].sum() == 0  # an empty box has no seam


# --- student augmentation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [1, 2, 3])
def test_random_crop_keeps_shape_and_is_a_pure_shift(pad):
    b, c, h, w = 64, 2, 9, 9
    images = torch.zeros(b, c, h, w)
    images[:, :, 4, 4] = torch.arange(1, b + 1, dtype=torch.float32)[:, None]  # one bright pixel per sample
    out = random_crop(images, pad, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    shifts = set()
    for i in range(b):
        assert torch.equal(out[i, 0], out[i, 1])  # the same shift for every channel of a sample
        hits = out[i, 0].nonzero()
        assert len(hits) == 1 and out[i, 0][tuple(hits[0])] == i + 1  # nothing lost, nothing blended
        dy, dx = (hits[0] - torch.tensor([4, 4])).tolist()
        assert abs(dy) <= pad and abs(dx) <= pad
        shifts.add((dy, dx))
    assert len(shifts) > 1  # one random offset per sample


def test_random_crop_zero_pad_is_identity_and_crop_is_seeded():
    images = torch.rand(4, 1, 6, 6)
    assert torch.equal(random_crop(images, 0), images)
    a = random_crop(images, 2, torch.Generator().manual_seed(3))
    b = random_crop(images, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_random_flip_mirrors_whole_samples_and_student_augment_without_flip_only_shifts():
    images = torch.rand(32, 1, 5, 5)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    for i in range(32):
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(-1))
    out = student_augment(images, pad=0, flip=False)
    assert torch.equal(out, images)


def test_random_flip_mirrors_about_half_the_samples():
    """A flip that never (or always) flips must fail: with a seeded generator some samples are mirrored, some not,
    and exactly those the generator's draws pick."""
    images = torch.rand(64, 1, 5, 5)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(flipped[i], images[i].flip(-1)) for i in range(64)])
    assert 16 < int(mirrored.sum()) < 48
    expected = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(mirrored, expected)
    assert torch.equal(flipped[~mirrored], images[~mirrored])
