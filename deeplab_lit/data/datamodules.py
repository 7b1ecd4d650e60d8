"""LightningDataModules: one base with the loaders and the shared settings, one small class per data set.

Every datamodule knows its ``num_classes`` and ``class_names`` at construction (so LightningCLI can
link ``data.num_classes`` to the model), exposes ``ignore_index`` (255), its ``normalization`` and a
``palette`` for writing masks, and yields batches ``{"image": float (N, 3, H, W), "mask": int64
(N, H, W), "name": list[str]}``; predict batches carry ``"path"`` instead of ``"mask"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from deeplab_lit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from deeplab_lit.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset, cityscapes_palette
from deeplab_lit.data.coco_stuff import COCO_STUFF_CLASSES, COCOStuffDataset
from deeplab_lit.data.folder import FolderDataset, index_images, read_stem_list, split_stems
from deeplab_lit.data.images import ImageFileDataset, SegmentationDataset
from deeplab_lit.data.labels import Colors, combined, read_palette
from deeplab_lit.data.loaders import default_num_workers, eval_collate, unrepeated_eval_sampler, worker_init
from deeplab_lit.data.pascal_context import PascalContextDataset, check_num_classes, pascal_context_classes
from deeplab_lit.data.preflight import (
    ClassCounts,
    check_crop_size,
    check_equal_sizes,
    check_splits,
    process_group,
)
from deeplab_lit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from deeplab_lit.data.transforms import (
    IGNORE_INDEX,
    SegmentationTransform,
    augmentation_seed,
    eval_transform,
    train_transform,
)
from deeplab_lit.data.voc import (
    TRAIN_SPLITS,
    VOC_CLASSES,
    VOCSegmentationDataset,
    download_voc_sbd,
    read_split,
    voc_palette,
    voc_split,
)
from deeplab_lit.normalization import IMAGENET, Normalization

#: What :meth:`SegmentationDataModule.build_split` returns: image/mask pairs, or several sets of them joined.
Split = SegmentationDataset | ConcatDataset[dict[str, Any]]


class SegmentationDataModule(LightningDataModule):
    """Base datamodule: transforms, loaders and metadata; subclasses only say how to build each split.

    Args:
        batch_size: Training batch size (per device).
        crop_size: Side of the square training crop.
        scale_range: Random scale range of training augmentation (aspect ratio kept).
        num_workers: DataLoader worker processes; None: :func:`default_num_workers` (cores per GPU).
        val_batch_size: Validation/test/predict batch size. Evaluation uses whole images, whose sizes
            differ in VOC, so 1 unless every image has the same size.
        pin_memory: Pin host memory for faster copies to the GPU (only used when CUDA is available).
        persistent_workers: Keep the worker processes alive between epochs (no start-up cost at every
            epoch and validation); off frees their memory between epochs. Ignored with ``num_workers: 0``.
        normalize_on_device: Workers hand over uint8 images and :meth:`on_after_batch_transfer`
            normalises them on the training device: 4x fewer bytes to collate, pin and copy, and no float
            arithmetic in the workers - for a GPU whose loader cannot keep up. The model, callbacks and
            metrics see the same normalised batches either way; a loader iterated outside a ``Trainer``
            then yields uint8 images.
        predict_path: Image file, folder or glob that ``predict`` runs over.
        calibration_path: Image file, folder or glob of the images ``predict_precision: int8`` calibrates
            on (:meth:`calibration_images`): a few training images (16-32), never the ones predicted,
            so that a picture's labels do not depend on which others are in the folder.
        normalization: Input normalisation (ImageNet statistics by default; ``CAFFE_BGR`` for Caffe weights).
        preflight: In ``setup``, read every image/mask pair of the splits the stage uses (fit: train and
            val; validate: val; test: test) before the first step, and stop with one error listing every
            bad file (see :mod:`deeplab_lit.data.preflight`); also refuses ``val_batch_size > 1`` when
            the images differ in size. Results are cached, so only the first run on a data set pays.
    """

    #: Label of pixels that are ignored in the loss and the metrics.
    ignore_index: int = IGNORE_INDEX
    #: Class names, index = class id; set by subclasses in ``__init__``.
    class_names: list[str]
    #: ``(256, 3)`` uint8 colours, index = class id, for palette PNGs.
    palette: np.ndarray

    def __init__(
        self,
        batch_size: int = 8,
        crop_size: int = 321,
        scale_range: tuple[float, float] = (0.5, 2.0),
        num_workers: int | None = None,
        val_batch_size: int = 1,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        normalize_on_device: bool = False,
        predict_path: str | None = None,
        calibration_path: str | None = None,
        normalization: Normalization = IMAGENET,
        preflight: bool = True,
    ):
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                f"batch_size and val_batch_size must be >= 1, got {batch_size} and {val_batch_size}"
            )
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None, got {num_workers}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.crop_size = crop_size
        low, high = scale_range  # a list from a config becomes a pair
        self.scale_range = (low, high)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_batch_size = val_batch_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.normalize_on_device = normalize_on_device
        self.predict_path = predict_path
        self.calibration_path = calibration_path
        self.normalization = normalization
        self.preflight = preflight
        #: The training split's class statistics, counted by the preflight (for ``class_weights: auto``).
        self.class_counts: ClassCounts | None = None
        self.train_transform(seed=0)  # check crop_size and scale_range now, not at setup
        self.train_dataset: Split | None = None
        self.val_dataset: Split | None = None
        self.test_dataset: Split | None = None
        self.predict_dataset: ImageFileDataset | None = None
        self.calibration_dataset: ImageFileDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (ignore label excluded)."""
        return len(self.class_names)

    def train_transform(self, seed: int | None = None) -> SegmentationTransform:
        """Build the training augmentation of this datamodule's settings."""
        return train_transform(
            self.crop_size,
            self.scale_range,
            self.normalization,
            seed=seed,
            normalize=not self.normalize_on_device,
        )

    def eval_transform(self) -> SegmentationTransform:
        """Whole image, normalised."""
        return eval_transform(self.normalization, normalize=not self.normalize_on_device)

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """Build the dataset for ``role`` in ``{"train", "val", "test"}``; subclasses implement it."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (all labelled splits when ``stage`` is None); preflight them."""
        splits: dict[str, Split] = {}
        if stage in ("fit", None):
            # albumentations ignores torch's seed: derive the pipeline's from it, so seed_everything holds.
            seed = augmentation_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            self.train_dataset = splits["train"] = self.build_split("train", self.train_transform(seed))
            if len(self.train_dataset) < self.batch_size:
                raise ValueError(
                    f"The training split has {len(self.train_dataset)} images, fewer than batch_size="
                    f"{self.batch_size}; with drop_last no batch would be left. Lower batch_size."
                )
        if stage in ("fit", "validate", None):
            self.val_dataset = splits["val"] = self.build_split("val", self.eval_transform())
        if stage in ("test", None):
            self.test_dataset = splits["test"] = self.build_split("test", self.eval_transform())
        if splits and self.preflight:
            self.run_preflight(splits)
        if stage == "predict":
            if self.predict_path is None:
                raise ValueError(
                    "predict needs images: set the datamodule's predict_path to an image file, folder or glob"
                )
            self.predict_dataset = ImageFileDataset(self.predict_path, self.eval_transform())
            if self.calibration_path is not None:  # listed now: a wrong path fails before any image
                self.calibration_dataset = ImageFileDataset(self.calibration_path, self.eval_transform())

    def run_preflight(self, splits: dict[str, Split]) -> None:
        """Read every pair of ``splits`` (role -> dataset) as training will, check ``val_batch_size``.

        A ``crop_size`` larger than every training image (at the top of ``scale_range``) is a warning.

        Under DDP each process reads its share and all of them raise the same error, or none; the cache
        is written by each machine's local rank 0.

        Raises:
            PreflightError: some pairs are bad (all of them listed).
            ValueError: ``val_batch_size > 1`` and the validation or test images differ in size.
        """
        rank, world, gather = process_group()
        trainer = self.trainer
        local_rank = trainer.local_rank if trainer is not None else int(os.environ.get("LOCAL_RANK", 0))
        checks = check_splits(
            splits, self.num_workers, rank=rank, world_size=world, gather=gather, write_cache=not local_rank
        )
        for role in ("val", "test"):
            if role in checks:
                check_equal_sizes(checks[role], self.val_batch_size)
        if "train" in checks:
            check_crop_size(checks["train"], self.crop_size, self.scale_range)
            self.class_counts = checks["train"].class_counts

    def _loader(
        self, dataset: Dataset[Any] | None, stage: str, batch_size: int, train: bool = False
    ) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.setup({stage!r}) must run before its {stage} dataloader"
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=None if train else unrepeated_eval_sampler(dataset),
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=worker_init,  # seed_worker, and SIGTERM left to the main process
            collate_fn=None if train else partial(eval_collate, stage=stage),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training crops; the last incomplete batch is dropped."""
        return self._loader(self.train_dataset, "fit", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """Whole validation images, in order."""
        return self._loader(self.val_dataset, "validate", self.val_batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        """Whole test images (the validation split unless the data set has a labelled test split)."""
        return self._loader(self.test_dataset, "test", self.val_batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        """Whole images of ``predict_path``: ``val_batch_size`` at a time if they share one size, else one.

        Photos of one folder often differ in size and orientation, and a batch is one tensor; their sizes
        are read from the file headers (cheap), so a mixed folder runs one image at a time with one info
        line, instead of stopping at the first batch of two sizes.
        """
        batch_size = self.val_batch_size
        dataset = self.predict_dataset
        if batch_size > 1 and isinstance(dataset, ImageFileDataset):
            sizes = {size for size in dataset.displayed_sizes() if size is not None}
            if len(sizes) > 1:
                rank_zero_info(
                    f"Predicting one image at a time: the {len(dataset)} images of {self.predict_path} have "
                    f"{len(sizes)} different sizes (val_batch_size={batch_size} needs one size per batch)"
                )
                batch_size = 1
        return self._loader(dataset, "predict", batch_size)

    def calibration_images(self) -> Iterator[Tensor]:
        """The ``calibration_path`` images, normalised, ``(1, 3, H, W)`` each (int8's calibration).

        Raises:
            ValueError: No ``calibration_path`` (here), or one of its files cannot be read (named, when
                the iterator reaches it).
        """
        if self.calibration_path is None:
            raise ValueError(
                "predict_precision='int8' calibrates on a few training images: set the datamodule's "
                "calibration_path to an image file, folder or glob of them (e.g. 16-32)"
            )
        if self.calibration_dataset is None:
            self.calibration_dataset = ImageFileDataset(self.calibration_path, self.eval_transform())
        return self._read_calibration(self.calibration_dataset)

    def _read_calibration(self, dataset: ImageFileDataset) -> Iterator[Tensor]:
        for index in range(len(dataset)):
            item = dataset[index]
            if item["image"] is None:
                raise ValueError(f"Calibration image {item['path']} cannot be read: {item['error']}")
            image = item["image"]
            yield (self.normalization.normalize(image) if image.dtype == torch.uint8 else image)[None]

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """With ``normalize_on_device``, normalise the uint8 images now that they are on the device."""
        if self.normalize_on_device and batch["image"].dtype == torch.uint8:
            batch["image"] = self.normalization.normalize(batch["image"])
        return batch


class VOCDataModule(SegmentationDataModule):
    """PASCAL VOC 2012 (21 classes), optionally with SBD's ``train_aug`` (10,582 images).

    Args:
        root: Folder holding ``VOCdevkit/VOC2012`` and, for ``train_aug``, ``benchmark_RELEASE/dataset``
            (see :mod:`deeplab_lit.data.voc` for the layout and the ``train_aug`` convention).
        train_split: ``"train_aug"`` (SBD + VOC train - VOC val, as in every DeepLab paper), ``"train"``
            (1,464 images) or ``"trainval"``.
        val_split: A file name under ``ImageSets/Segmentation`` (``"val"``: 1,449 images); also used by test.
        download: Fetch VOC and SBD with torchvision's downloaders (in ``prepare_data``) if missing.
        **kwargs: :class:`SegmentationDataModule`'s arguments.

    ``root`` is checked by ``setup`` for the stages that read the splits (fit, validate, test), so that
    ``predict`` runs on a machine without VOC.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train_aug",
        val_split: str = "val",
        download: bool = False,
        **kwargs: Any,
    ):
        if train_split not in TRAIN_SPLITS:
            raise ValueError(f"train_split must be one of {', '.join(TRAIN_SPLITS)}; got {train_split!r}")
        super().__init__(**kwargs)
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.download = download
        self.class_names = list(VOC_CLASSES)
        self.palette = voc_palette()

    def prepare_data(self) -> None:
        """Download VOC (and SBD for ``train_aug``) when ``download=True``."""
        if self.download:
            download_voc_sbd(self.root, sbd=self.train_split == "train_aug")

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """``train`` -> ``train_split``; ``val`` and ``test`` -> ``val_split``."""
        return voc_split(self.root, self.train_split if role == "train" else self.val_split, transform)


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine annotations, 19 classes (void = 255).

    Defaults follow DeepLabv3/v3+ on Cityscapes: 769 x 769 crops (odd, so that ``(769 - 1) / 16``
    is whole at output stride 16), scale 0.5-2.0; batch size 4 per device (the papers use 8 over
    several accelerators). The public test masks are all void, so ``test`` runs on ``val`` by default.

    Args:
        root: Folder holding ``leftImg8bit`` and ``gtFine`` (see :mod:`deeplab_lit.data.cityscapes`).
        train_split: ``"train"``, ``"val"`` or ``"trainval"`` (train + val).
        val_split: Split used for validation.
        test_split: Split used by ``test``.
        batch_size: Training batch size (per device).
        crop_size: Side of the square training crop.
        **kwargs: :class:`SegmentationDataModule`'s other arguments.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        batch_size: int = 4,
        crop_size: int = 769,
        **kwargs: Any,
    ):
        super().__init__(batch_size=batch_size, crop_size=crop_size, **kwargs)
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.class_names = list(CITYSCAPES_CLASSES)
        self.palette = cityscapes_palette()

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """One split, or train + val for ``"trainval"``."""
        split = self.splits[role]
        if split == "trainval":
            return ConcatDataset([CityscapesDataset(self.root, s, transform) for s in ("train", "val")])
        return CityscapesDataset(self.root, split, transform)


class NamedSplitsDataModule(SegmentationDataModule):
    """Base of the public data sets whose splits are named (a folder or a list file each).

    A subclass states its class names, in its signature its default split names, and how to build one
    split; ``test`` runs on ``test_split``, the validation split where the test annotations are not public.

    Args:
        root: The data set's folder.
        train_split: Split used for training.
        val_split: Split used for validation.
        test_split: Split used by ``test``.
        **kwargs: :class:`SegmentationDataModule`'s arguments.
    """

    def __init__(self, root: str, train_split: str, val_split: str, test_split: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.palette = voc_palette()


class ADE20KDataModule(NamedSplitsDataModule):
    """ADE20K (MIT Scene Parsing, 150 classes; annotation 0 "other" is void).

    512 x 512 crops by default, as the DeepLab model zoo and mmsegmentation train it. The test images
    (``release_test``) have no annotations, so ``test`` runs on ``validation``.

    Args:
        root: Folder holding ``ADEChallengeData2016`` (see :mod:`deeplab_lit.data.ade20k`).
        train_split: Split folder used for training (``"training"``: 20,210 images).
        val_split: Split folder used for validation (``"validation"``: 2,000 images).
        test_split: Split folder used by ``test``.
        crop_size: Side of the square training crop.
        **kwargs: :class:`SegmentationDataModule`'s other arguments.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "training",
        val_split: str = "validation",
        test_split: str = "validation",
        crop_size: int = 512,
        **kwargs: Any,
    ):
        super().__init__(root, train_split, val_split, test_split, crop_size=crop_size, **kwargs)
        self.class_names = list(ADE20K_CLASSES)

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """The role's split folder."""
        return ADE20KDataset(self.root, self.splits[role], transform)


class PascalContextDataModule(NamedSplitsDataModule):
    """PASCAL-Context: the 59 most frequent classes plus background (60), or the 59 alone (59).

    As evaluated in DeepLab v2 (Sec. 4.2): 60 classes, background included. ``test`` runs on ``val``.

    Args:
        root: Folder holding ``VOCdevkit/VOC2010`` (see :mod:`deeplab_lit.data.pascal_context`).
        num_classes: 60 (background = class 0) or 59 (background void: 0 -> 255, ``v`` -> ``v - 1``).
        train_split: A file name under ``ImageSets/SegmentationContext`` (``"train"``: 4,998 images).
        val_split: The same for validation (``"val"``: 5,105 images).
        test_split: The same for ``test``.
        **kwargs: :class:`SegmentationDataModule`'s arguments.
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 60,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        **kwargs: Any,
    ):
        check_num_classes(num_classes)
        super().__init__(root, train_split, val_split, test_split, **kwargs)
        self.class_names = pascal_context_classes(num_classes)

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """The role's split file, with this data module's number of classes."""
        return PascalContextDataset(self.root, self.splits[role], self.num_classes, transform)


class COCOStuffDataModule(NamedSplitsDataModule):
    """COCO-Stuff 164k: 171 classes (80 things, 91 stuff); unlabelled and unused ids void.

    512 x 512 crops by default, as mmsegmentation trains it. The test-dev images have no annotations, so
    ``test`` runs on ``val2017``.

    Args:
        root: Folder holding ``images`` and ``annotations`` (see :mod:`deeplab_lit.data.coco_stuff`).
        train_split: Split folder used for training (``"train2017"``: 118k images).
        val_split: Split folder used for validation (``"val2017"``: 5k images).
        test_split: Split folder used by ``test``.
        crop_size: Side of the square training crop.
        **kwargs: :class:`SegmentationDataModule`'s other arguments.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        crop_size: int = 512,
        **kwargs: Any,
    ):
        super().__init__(root, train_split, val_split, test_split, crop_size=crop_size, **kwargs)
        self.class_names = list(COCO_STUFF_CLASSES)

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """The role's split folder."""
        return COCOStuffDataset(self.root, self.splits[role], transform)


class FolderDataModule(SegmentationDataModule):
    """Your own data: ``root/<image_dir>/<stem>.jpg|png`` with ``root/<mask_dir>/<stem>.png`` masks.

    Splits: give ``train_list`` and ``val_list`` (text files, one stem per line, paths relative to
    ``root`` or absolute), or neither, for a deterministic split by ``val_fraction`` and ``split_seed``.
    ``test`` uses ``test_list`` if given, else the validation split. See :mod:`deeplab_lit.data.folder`.

    Masks hold one class index per pixel (255 = ignore), or, with ``palette``, colours. The label options
    apply in this order (:func:`deeplab_lit.data.labels.combined`): ``palette`` (colour ``k`` -> ``k``),
    ``label_map``, ``reduce_zero_label``; the class check comes last.

    Args:
        root: Data set folder.
        class_names: Class names, index = class id (index 0 is usually ``"background"``).
        image_dir: Image folder, relative to ``root``.
        mask_dir: Mask folder, relative to ``root``.
        train_list: Training stems list file.
        val_list: Validation stems list file.
        test_list: Test stems list file.
        val_fraction: Fraction of images held out for validation when no lists are given.
        split_seed: Seed of that split.
        reduce_zero_label: 0 -> 255 (ignored), every ``v > 0`` -> ``v - 1``: for masks whose 0 means
            "unlabelled" (ADE20K's convention).
        label_map: ``{source: target}`` applied to the stored values (or palette indices) first; values
            not named keep theirs, 255 stays ignored unless mapped. E.g. ``{3: 255}`` ignores class 3.
        palette: For RGB masks: colours ``[[r, g, b], ...]`` (index = value), or a text file (relative to
            ``root`` or absolute) with one ``r g b`` per line. A colour not listed is an error naming the
            file and the colour. Predictions are written in these colours too.
        **kwargs: :class:`SegmentationDataModule`'s arguments.
    """

    def __init__(
        self,
        root: str,
        class_names: list[str],
        image_dir: str = "images",
        mask_dir: str = "masks",
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        reduce_zero_label: bool = False,
        label_map: dict[int, int] | None = None,
        palette: list[list[int]] | str | None = None,
        **kwargs: Any,
    ):
        if not class_names or len(set(class_names)) != len(class_names) or len(class_names) > IGNORE_INDEX:
            raise ValueError(
                f"class_names must be 1..255 distinct names (index = class id); got {class_names}"
            )
        if (train_list is None) != (val_list is None):
            raise ValueError(
                "Give both train_list and val_list, or neither (then val_fraction splits the folder)"
            )
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Data set folder not found: {self.root}")
        self.class_names = list(class_names)
        colors: Colors | str | None = palette
        if isinstance(palette, str) and not Path(palette).is_absolute():
            colors = str(self.root / palette)
        self.label_map = combined(
            colors, label_map, reduce_zero_label
        )  # a bad option fails here, not at setup
        self.palette = voc_palette()
        if colors is not None:
            listed = read_palette(colors)
            self.palette[: len(listed)] = listed
        self.image_dir, self.mask_dir = self.root / image_dir, self.root / mask_dir
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.val_fraction, self.split_seed = val_fraction, split_seed

    def _stems(self, role: str, images: dict[str, Path]) -> tuple[list[str], str | Path]:
        """Return the stems of ``role`` and where they came from."""
        role = "val" if role == "test" and self.lists["test"] is None else role
        listed = self.lists[role]
        if listed is not None:
            path = Path(listed)
            path = path if path.is_absolute() else self.root / path
            return read_stem_list(path), path
        train, val = split_stems(list(images), self.val_fraction, self.split_seed)
        return (
            train if role == "train" else val
        ), f"{self.image_dir} ({role} part, val_fraction={self.val_fraction})"

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """Images of the role's stems with their masks."""
        images = index_images(self.image_dir)
        stems, source = self._stems(role, images)
        return FolderDataset(
            images, stems, self.mask_dir, self.num_classes, transform, source, self.label_map
        )


class SyntheticDataModule(SegmentationDataModule):
    """The embedded default: shapes on clutter (6 classes), generated once in the VOC layout.

    The data are written by :func:`~deeplab_lit.data.synthetic.generate_synthetic` (in
    ``prepare_data``, or in ``setup`` if that did not run) and read back by the VOC reader.

    Args:
        root: Where the data set is written (skipped if an identical one is there).
        num_train: Training images.
        num_val: Validation images (also the test split).
        image_size: Image side in pixels.
        max_objects: Most shapes per image.
        object_size: ``(min, max)`` object radius as a fraction of ``image_size`` (log-uniform).
        clutter: Background difficulty in [0, 1] (the number of distractors).
        seed: Seed of the data set.
        imbalance: How many times likelier the commonest shape class is than the rarest (``cross``);
            1 (default) keeps the classes balanced.
        batch_size: Training batch size (per device).
        crop_size: Side of the square training crop (the whole 128 px image).
        val_batch_size: Evaluation batch size: every image has one size, so 16 too.
        **kwargs: :class:`SegmentationDataModule`'s other arguments.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        num_train: int = 400,
        num_val: int = 80,
        image_size: int = 128,
        max_objects: int = 4,
        object_size: tuple[float, float] = (0.1, 0.33),
        clutter: float = 0.5,
        seed: int = 0,
        imbalance: float = 1.0,
        batch_size: int = 16,
        crop_size: int = 128,
        val_batch_size: int = 16,
        **kwargs: Any,
    ):
        super().__init__(batch_size=batch_size, crop_size=crop_size, val_batch_size=val_batch_size, **kwargs)
        self.root = Path(root)
        self.generation: dict[str, Any] = {
            "num_train": num_train, "num_val": num_val, "image_size": image_size, "max_objects": max_objects,
            "object_size": tuple(object_size), "clutter": clutter, "seed": seed,
            "imbalance": imbalance,
        }  # fmt: skip
        self.class_names = list(SYNTHETIC_CLASSES)
        self.palette = voc_palette()

    def prepare_data(self) -> None:
        """Generate the data set unless an identical one exists."""
        generate_synthetic(self.root, **self.generation)

    def build_split(self, role: str, transform: SegmentationTransform) -> Split:
        """``train`` or ``val`` (``test`` -> ``val``) through the VOC reader."""
        generate_synthetic(self.root, **self.generation)  # no-op when prepare_data already ran
        split_file = (
            self.root / "ImageSets" / "Segmentation" / ("train.txt" if role == "train" else "val.txt")
        )
        return VOCSegmentationDataset(
            self.root, read_split(split_file), self.num_classes, transform, source=split_file
        )
