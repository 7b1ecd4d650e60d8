import numpy as np
import pytest
import torch

from deeplab_lit.metrics import BoundaryBandIoU, SegmentationMetrics, boundary_band, scores_from_confusion


def reference_scores(preds: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255):
    """Plain numpy confusion matrix -> VOC scores, written independently of the package."""
    keep = target != ignore
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (target[keep], preds[keep]), 1)
    ious = []
    for c in range(num_classes):
        tp = conf[c, c]
        union = conf[c, :].sum() + conf[:, c].sum() - tp
        if union > 0:
            ious.append(tp / union)
    return float(np.mean(ious)), float(np.trace(conf) / conf.sum())


def test_miou_matches_plain_confusion_matrix_over_batches_with_ignore():
    gen = torch.Generator().manual_seed(0)
    num_classes = 6
    metric = SegmentationMetrics(num_classes)
    all_p, all_t = [], []
    for _ in range(4):  # several batches: the score must be over the whole set, not a mean of batches
        target = torch.randint(0, num_classes - 1, (2, 17, 23), generator=gen)  # class 5 never in GT
        target[torch.rand(target.shape, generator=gen) < 0.2] = 255
        preds = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target.clamp(max=4), 0)
        preds[0, 0, :3] = 5  # predicted but absent from GT -> IoU 0, counts in the mean
        metric.update(preds, target)
        all_p.append(preds.numpy())
        all_t.append(target.numpy())
    scores = metric.compute()
    ref_miou, ref_acc = reference_scores(np.concatenate(all_p), np.concatenate(all_t), num_classes)
    assert scores["mIoU"].item() == pytest.approx(ref_miou, abs=1e-6)
    assert scores["pixel_acc"].item() == pytest.approx(ref_acc, abs=1e-6)
    assert scores["iou"][5].item() == 0.0


@pytest.mark.parametrize("deterministic", [False, True])
def test_confusion_matrix_is_exact_in_deterministic_mode_and_from_scores(deterministic):
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (3, 31, 29), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.3] = 255
    scores = torch.randn(3, 4, 31, 29, generator=gen)
    preds = scores.argmax(1)
    keep = (target != 255).numpy()
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (target.numpy()[keep], preds.numpy()[keep]), 1)
    from_labels, from_scores = SegmentationMetrics(4), SegmentationMetrics(4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        from_labels.update(preds, target)
        from_scores.update(scores, target)  # (N, C, H, W) scores: argmax taken
    finally:
        torch.use_deterministic_algorithms(previous)
    np.testing.assert_array_equal(from_labels.confmat.numpy(), expected)
    np.testing.assert_array_equal(from_scores.confmat.numpy(), expected)


def test_class_absent_from_both_is_left_out_of_the_mean():
    conf = torch.tensor([[5, 0, 0], [5, 5, 0], [0, 0, 0]])
    scores = scores_from_confusion(conf)
    assert torch.isnan(scores["iou"][2])
    assert scores["mIoU"].item() == pytest.approx(0.5)
    assert scores["mean_acc"].item() == pytest.approx((1.0 + 0.5) / 2)


def test_boundary_band_on_hand_made_mask():
    target = torch.zeros(1, 9, 9, dtype=torch.long)
    target[:, :, 5:] = 1  # vertical edge between columns 4 and 5
    band0 = boundary_band(target, 0)
    assert band0[0, :, 4].all() and band0[0, :, 5].all() and band0.sum() == 18
    band2 = boundary_band(target, 2)
    assert band2[0, :, 2:8].all() and not band2[0, :, :2].any() and not band2[0, :, 8:].any()


def test_boundary_band_iou_counts_only_pixels_near_edges():
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[:, :, 10:] = 1
    preds = target.clone()
    preds[:, :, 0] = 1  # an error far from the edge: invisible to a narrow band
    metric = BoundaryBandIoU(num_classes=2, widths=(1, 10))
    metric.update(preds, target)
    out = metric.compute()
    assert out[1].item() == pytest.approx(1.0)
    assert out[10].item() < 1.0
    with pytest.raises(ValueError, match="band widths"):
        BoundaryBandIoU(num_classes=2, widths=(0,))
