"""The training objectives, each against an independent computation on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.losses import (
    CrossEntropy,
    LossSpecError,
    LovaszSoftmax,
    OHEMCrossEntropy,
    Sum,
    build_loss,
    median_frequency_weights,
)

IGNORE = 255


def batch(seed: int = 0, n: int = 2, c: int = 4, h: int = 5, w: int = 7, dtype=torch.float32):
    """Random logits and masks with a few void pixels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2
    masks = torch.randint(0, c, (n, h, w), generator=gen)
    masks[:, 0, :3] = IGNORE
    return logits, masks


def pixel_losses(logits, masks):
    """Per-pixel cross-entropy as a Python list (void pixels 0), written out from log-softmax."""
    log_p = logits.double().log_softmax(dim=1)
    out = []
    for i in range(masks.shape[0]):
        for y in range(masks.shape[1]):
            for x in range(masks.shape[2]):
                label = int(masks[i, y, x])
                out.append(0.0 if label == IGNORE else -float(log_p[i, label, y, x]))
    return out


# ---------------------------------------------------------------------------------- cross-entropy
def test_defaults_are_the_plain_mean_cross_entropy_over_labelled_pixels():
    logits, masks = batch()
    losses = [v for v, m in zip(pixel_losses(logits, masks), masks.flatten()) if m != IGNORE]
    expected = sum(losses) / len(losses)
    assert float(CrossEntropy()(logits, masks, 0)) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(CrossEntropy()(logits, masks, 7), F.cross_entropy(logits, masks, ignore_index=IGNORE))


def test_class_weights_equal_torch_weighted_cross_entropy():
    logits, masks = batch(1)
    weights = [0.5, 2.0, 1.0, 3.0]
    expected = F.cross_entropy(logits, masks, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert torch.allclose(CrossEntropy(class_weights=weights)(logits, masks, 0), expected)
    assert not torch.allclose(CrossEntropy()(logits, masks, 0), expected)


def test_bootstrapping_sums_the_k_largest_pixel_losses_over_the_non_zero_ones():
    logits, masks = batch(2)
    losses = sorted(pixel_losses(logits, masks), reverse=True)  # void pixels: 0, counted in the total
    k = int(0.25 * len(losses))
    top = losses[:k]
    expected = sum(top) / sum(v != 0 for v in top)
    got = CrossEntropy(top_k_percent_pixels=0.25)(logits, masks, 0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_bootstrapping_divides_by_the_non_zero_losses_when_void_pixels_are_among_the_top_k():
    logits = torch.tensor([[[[2.0, 0.0, 0.0, -1.0]], [[0.0, 0.0, 1.0, 1.0]]]])  # N=1, C=2, H=1, W=4
    masks = torch.tensor([[[1, IGNORE, IGNORE, 0]]])
    # losses: softplus(2) = 2.1269, 0, 0, softplus(2) = 2.1269; k = int(0.75 * 4) = 3 -> two non-zero
    expected = 2 * math.log1p(math.exp(2.0)) / 2
    assert float(CrossEntropy(top_k_percent_pixels=0.75)(logits, masks, 0)) == pytest.approx(
        expected, rel=1e-6
    )


def test_hard_example_mining_step_goes_linearly_from_all_pixels_to_the_fraction():
    loss = CrossEntropy(top_k_percent_pixels=0.25, hard_example_mining_step=100)
    # the reference's int((ratio * 0.25 + 1 - ratio) * 1000)
    assert [loss.top_k_pixels(1000, s) for s in (0, 50, 100, 400)] == [1000, 625, 250, 250]
    assert CrossEntropy(top_k_percent_pixels=0.25).top_k_pixels(1000, 0) == 250
    logits, masks = batch(3)
    at_start = loss(logits, masks, 0)  # every pixel kept: the mean over the labelled ones
    assert torch.allclose(at_start, F.cross_entropy(logits, masks, ignore_index=IGNORE))
    assert loss(logits, masks, 100) > at_start  # only the hardest quarter


# ------------------------------------------------------------------------------------------- OHEM
def ohem_kept(logits, masks, thresh, min_kept):
    """The mmsegmentation rule written out: pixels whose label's probability is below the threshold."""
    prob = logits.double().softmax(dim=1)
    cells = [
        (i, y, x) for i in range(masks.shape[0]) for y in range(masks.shape[1]) for x in range(masks.shape[2])
    ]
    valid = [(c, float(prob[c[0], int(masks[c]), c[1], c[2]])) for c in cells if int(masks[c]) != IGNORE]
    ordered = sorted(p for _, p in valid)
    threshold = max(thresh, ordered[min(min_kept * masks.shape[0], len(ordered) - 1)])
    return {c for c, p in valid if p < threshold}


@pytest.mark.parametrize(("thresh", "min_kept"), [(0.7, 1), (0.05, 10), (0.3, 1000)])
def test_ohem_keeps_the_pixels_below_the_threshold_or_the_min_kept_hardest(thresh, min_kept):
    logits, masks = batch(4)
    loss = OHEMCrossEntropy(thresh=thresh, min_kept=min_kept)
    kept = loss.kept(logits, masks)
    assert {tuple(int(v) for v in c) for c in kept.nonzero()} == ohem_kept(logits, masks, thresh, min_kept)
    hard = masks.where(kept, IGNORE)
    assert torch.allclose(loss(logits, masks, 0), F.cross_entropy(logits, hard, ignore_index=IGNORE))


def test_ohem_min_kept_counts_per_image_as_mmsegmentation():
    logits, masks = batch(5)
    kept = OHEMCrossEntropy(thresh=1e-6, min_kept=4).kept(logits, masks)
    assert int(kept.sum()) == 4 * masks.shape[0]  # distinct probabilities: exactly min_kept x N


# ----------------------------------------------------------------------------------------- Lovász
def lovasz_from_the_paper(logits, masks, classes="present"):
    """Berman et al. Eq. (8)-(9): the Lovász extension of Delta_J(M) = |M| / |F u M|, prefix by prefix.

    For each class, the pixels sorted by decreasing error m_i = |[y = c] - p_c|; the extension is
    sum_i m_(i) (Delta({1..i}) - Delta({1..i-1})), with the set function evaluated on each prefix.
    """
    prob = logits.double().softmax(dim=1).movedim(1, -1)[masks != IGNORE]  # (P, C)
    labels = masks[masks != IGNORE]
    per_class = []
    for c in range(prob.shape[1]):
        foreground = {i for i in range(len(labels)) if int(labels[i]) == c}
        if classes == "present" and not foreground:
            continue
        errors = [abs((i in foreground) - float(prob[i, c])) for i in range(len(labels))]
        order = sorted(range(len(labels)), key=lambda i: -errors[i])
        total, previous, prefix = 0.0, 0.0, set()
        for i in order:
            prefix.add(i)
            jaccard = len(prefix) / len(foreground | prefix)
            total += errors[i] * (jaccard - previous)
            previous = jaccard
        per_class.append(total)
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("classes", ["present", "all"])
def test_lovasz_softmax_equals_the_extension_computed_from_the_paper(classes):
    logits, masks = batch(6, c=5, dtype=torch.float64)
    masks[masks == 4] = 1  # class 4 absent: "present" leaves it out, "all" counts it
    got = LovaszSoftmax(classes=classes)(logits, masks, 0)
    assert float(got) == pytest.approx(lovasz_from_the_paper(logits, masks, classes), rel=1e-10)


def test_lovasz_per_image_averages_the_images_losses():
    logits, masks = batch(7, dtype=torch.float64)
    per_image = [lovasz_from_the_paper(logits[i : i + 1], masks[i : i + 1]) for i in range(2)]
    got = LovaszSoftmax(per_image=True)(logits, masks, 0)
    assert float(got) == pytest.approx(sum(per_image) / 2, rel=1e-10)


# ---------------------------------------------------------------------------- shared properties
ALL_LOSSES = {
    "ce": CrossEntropy(),
    "weighted": CrossEntropy(class_weights=[1.0, 2.0, 0.5, 1.0]),
    "bootstrapped": CrossEntropy(top_k_percent_pixels=0.3),
    "smoothed": CrossEntropy(label_smoothing=0.1),
    "ohem": OHEMCrossEntropy(thresh=0.5, min_kept=3),
    "lovasz": LovaszSoftmax(),
    "lovasz_per_image": LovaszSoftmax(per_image=True),
    "sum": Sum([CrossEntropy(), LovaszSoftmax()], weights=[1.0, 0.5]),
}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_are_finite_and_void_pixels_change_nothing(name):
    loss = ALL_LOSSES[name]
    logits, masks = batch(8)
    logits.requires_grad_(True)
    value = loss(logits, masks, 10)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    void = (masks == IGNORE).unsqueeze(1).expand_as(logits)
    assert logits.grad[void].abs().max() == 0
    other = logits.detach().clone()
    other[void] = torch.randn(int(void.sum())) * 10
    assert torch.allclose(loss(other, masks, 10), value)


def test_sum_is_the_weighted_sum_of_its_losses():
    logits, masks = batch(9)
    total = Sum([CrossEntropy(), LovaszSoftmax()], weights=[1.0, 0.5])(logits, masks, 0)
    expected = CrossEntropy()(logits, masks, 0) + 0.5 * LovaszSoftmax()(logits, masks, 0)
    assert torch.allclose(total, expected)


# ------------------------------------------------------------------------------------ class weights
def test_median_frequency_weights_by_hand():
    # f = 60/100, 30/60, 10/40 = 0.6, 0.5, 0.25 (class 3 absent); median 0.5
    weights, absent = median_frequency_weights([60, 30, 10, 0], [100, 60, 40, 0])
    assert torch.allclose(weights, torch.tensor([0.5 / 0.6, 1.0, 2.0, 1.0]))
    assert absent == [3]
    weights, _ = median_frequency_weights([10, 30], [100, 100])  # even count: the middle two's mean, 0.2
    assert torch.allclose(weights, torch.tensor([2.0, 2 / 3]))


def test_auto_weights_wait_for_the_counts_then_weight_as_torch():
    loss = CrossEntropy(class_weights="auto", num_classes=4)
    logits, masks = batch(10)
    assert loss.needs_class_counts
    with pytest.raises(ValueError, match="preflight"):
        loss(logits, masks, 0)
    loss.set_class_counts([60, 30, 10], [100, 60, 40])  # a class beyond the counts: absent
    assert not loss.needs_class_counts
    expected = F.cross_entropy(logits, masks, weight=torch.tensor([0.5 / 0.6, 1, 2, 1]), ignore_index=IGNORE)
    assert torch.allclose(loss(logits, masks, 0), expected)
    assert "class_weight" in loss.state_dict()
    assert "class_weight" not in CrossEntropy().state_dict()  # old checkpoints hold no loss keys


# ------------------------------------------------------------------------------------------ build
class OwnLoss(nn.Module):
    """A user's loss: mean squared error of the softmax against the one-hot labels."""

    def __init__(self, scale: float = 1.0, ignore_index: int = -1):
        super().__init__()
        self.scale, self.ignore_index = scale, ignore_index

    def forward(self, logits, masks, step):
        valid = masks != self.ignore_index
        target = F.one_hot(masks.where(valid, 0), logits.shape[1]).movedim(-1, 1).float()
        return self.scale * ((logits.softmax(1) - target) ** 2).sum(1)[valid].mean()


def test_build_loss_passes_the_module_values_and_builds_a_users_class_by_path():
    own = build_loss({"class_path": f"{__name__}.OwnLoss", "init_args": {"scale": 2.0}}, 7, 4)
    assert isinstance(own, OwnLoss) and own.scale == 2.0 and own.ignore_index == 7
    weighted = build_loss(
        {"class_path": "deeplab_lit.losses.CrossEntropy", "init_args": {"class_weights": "auto"}}, 9, 3
    )
    assert weighted.ignore_index == 9 and weighted.class_weight.shape == (3,)
    nested = build_loss(
        {
            "class_path": "deeplab_lit.losses.Sum",
            "init_args": {
                "losses": [
                    {"class_path": "deeplab_lit.losses.OHEMCrossEntropy"},
                    {"class_path": "deeplab_lit.losses.LovaszSoftmax"},
                ]
            },
        },
        9,
        3,
    )
    assert [m.ignore_index for m in nested.losses] == [9, 9]
    assert isinstance(build_loss(None, 255, 3), CrossEntropy)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"class_path": "deeplab_lit.losses.Dice"}, "names no class"),
        ({"class_path": "CrossEntropy"}, "names no class"),
        ({"class_path": "deeplab_lit.losses.CrossEntropy", "init_args": {"top_k": 0.2}}, "does not take"),
        (
            {"class_path": "deeplab_lit.losses.CrossEntropy", "init_args": {"ignore_index": 0}},
            "model.init_args.ignore_index",
        ),
        ({"class_path": "torch.Tensor"}, "not an nn.Module"),
        ("CrossEntropy", "mapping"),
    ],
)
def test_bad_loss_options_fail_with_a_clear_message(spec, match):
    with pytest.raises(LossSpecError, match=match):
        build_loss(spec, 255, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_weights": [1.0, 2.0]}, "2 values for 4 classes"),
        ({"class_weights": "median"}, "'auto'"),
        ({"top_k_percent_pixels": 0.0}, "top_k_percent_pixels"),
    ],
)
def test_bad_cross_entropy_values_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossEntropy(num_classes=4, **kwargs)
