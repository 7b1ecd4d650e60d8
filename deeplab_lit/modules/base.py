"""The one training/evaluation loop every DeepLab version shares.

A version differs only in its builder (:attr:`SegmentationModule.builder`, which backbone, head and
decoder) and its defaults; the network is built here from the hyper-parameters the builder accepts, and the
step, the loss, the optimiser, the "poly" schedule and the metrics live here once.

The papers' recipe is the default (DeepLab v2 Sec. 4.1, v3 Sec. 4.1): pixel-wise cross-entropy that
ignores label 255, SGD with momentum 0.9 and weight decay, the learning rate multiplied by
``(1 - iter / max_iter) ** 0.9`` every iteration, and a 10x learning rate on the newly added layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from deeplab_lit.acceleration import accelerate, compile_mode, fast_sgd_options
from deeplab_lit.classes import class_defaults
from deeplab_lit.engines import check_engine, predict_network
from deeplab_lit.inference import InferenceConfig, Model, segment
from deeplab_lit.losses import ClassWeighted, build_loss
from deeplab_lit.metrics import SegmentationMetrics
from deeplab_lit.models.fusion import BATCHNORMS
from deeplab_lit.models.heads import separable_options
from deeplab_lit.modules.schedule import apply_options, options_of
from deeplab_lit.modules.trainable_crf import NETWORK_OUTPUT, build_trainable_crf
from deeplab_lit.normalization import Normalization
from deeplab_lit.precision import check_precision
from deeplab_lit.weights.imagenet import build_network
from deeplab_lit.weights.load import Checkpoint, load_weights, read_checkpoint, resolve_options

if TYPE_CHECKING:  # annotation only: its home moved between Lightning releases
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

# Checkpoints store these small config objects in their hyper-parameters; torch.load(weights_only=True),
# Lightning's default, refuses unknown classes, so they are declared safe to unpickle.
torch.serialization.add_safe_globals([InferenceConfig, Normalization])

Batch = dict[str, Any]
STAGES = ("val", "test")
#: Suffix of the trainable CRF's metrics and logged scores (``val/mIoU_crf_rnn``).
CRF_RNN_SUFFIX = "_crf_rnn"


class SegmentationModule(LightningModule):
    """Shared LightningModule: ``model(x)`` gives logits (N, C, H, W) at the input's size.

    Args:
        num_classes: Number of classes, void excluded (21 for VOC, 19 for Cityscapes).
        backbone: Backbone name (see ``deeplab_lit.models.BACKBONES``).
        pretrained_backbone: ``True`` for torchvision/timm ImageNet weights, a weights-enum name, or a
            local state-dict path; ``False`` for random initialisation. With ``vgg16`` this also
            initialises the LargeFOV fc6/fc7 from VGG's ImageNet fc layers, subsampled (DeepLab v1 Sec. 3.1).
        weights: A registered name (``deeplabv3_resnet101.coco_voc``; :mod:`deeplab_lit.weights.registry`),
            or the path or URL of a whole-model checkpoint to start from: this project's, torchvision's
            ``deeplabv3_resnet50/101`` and ``deeplabv3_mobilenet_v3_large``, or kazuto1011/deeplab-pytorch's
            DeepLab v1/v2 ResNet-101 (see :mod:`deeplab_lit.weights.load`). Architecture options left at
            their defaults are taken from it (e.g. ``style``, ``msc_scales``); options set to other values
            than it needs raise ValueError. The input normalisation it needs is checked against the data's
            at ``setup``.
        reinit_classifier: With ``weights``, load everything except the layers that output class scores
            (another class count or label set).
        lr: Base learning rate (backbone); new layers get ``lr * head_lr_mult``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2).
        poly_power: Exponent of the "poly" schedule, stepped every iteration.
        head_lr_mult: Learning-rate multiplier of the layers not in the backbone (10 in the papers).
        freeze_bn: Keep the backbone's BatchNorm statistics and affine parameters fixed (DeepLab v2,
            trained with small batches).
        ignore_index: Label that contributes neither loss nor metric.
        aux_weight: Loss weight of an auxiliary head's output (outputs named ``aux*``).
        inference: Evaluation-time inference (multi-scale, flip, sliding window).
        class_names: Names for per-class metrics; defaults to ``class_0..``. Linked from the data by the CLI.
        channels_last: Keep the network's weights in channels-last (NHWC) memory format; the first
            convolution then turns each batch into it too, and every feature map stays in it. Faster
            convolutions with mixed precision on GPUs (tensor cores) and with oneDNN on CPUs (ResNet
            backbones; about neutral for the depthwise MobileNetV2/Xception-65); results equal the default
            format's to float rounding. ``benchmarks/speed.py --ablations`` measures it on your machine.
        compile: ``torch.compile`` the network's parts in place (backbone, head, decoder, aux head;
            ``nn.Module.compile``, so checkpoint keys are unchanged): ``true`` for torch's default mode,
            or a mode by name, e.g. ``reduce-overhead`` (CUDA graphs: removes the per-kernel launch cost
            that dominates small GPU batches) or ``max-autotune``. The first steps are slow while it
            compiles, and evaluation on images of varying sizes recompiles (then goes dynamic); needs a
            C compiler on CPUs. Off by default; ``benchmarks/speed.py --compile MODE`` measures it.
            ``predict`` runs what ``predict_engine`` says instead (``compile`` there: the whole folded
            network, with freezing).
        fuse_bn_for_inference: In ``predict`` only, run a copy of the network with every BatchNorm folded
            into the preceding convolution (:func:`~deeplab_lit.models.fusion.fuse_conv_bn`): same
            outputs to 1e-5, fewer memory passes; on the CPU that copy and its input are also
            channels-last (NHWC), where oneDNN's convolutions are fastest (BENCHMARKS.md, "Predict on the
            CPU"). Training, validation and test use the network as is, and checkpoints keep the
            unfolded weights.
        predict_engine: What runs that folded copy in ``predict`` (:mod:`deeplab_lit.engines`):
            ``"eager"`` (PyTorch, no warm-up), ``"compile"`` (``torch.compile`` of the whole network
            with freezing; compiles per input size) or ``"onnxruntime"`` (exported once per run, CPU,
            the ``export`` extra). Test-time augmentation and sliding windows work with each.
        predict_precision: The arithmetic of that copy in ``predict`` (:mod:`deeplab_lit.precision`):
            ``"fp32"`` (default), ``"bf16"`` (autocast; GPUs with bf16, CPUs with AVX-512 BF16 or AMX,
            refused elsewhere) or ``"int8"`` (PT2E static quantization for x86 CPUs, calibrated on the
            data module's ``calibration_path`` images; the ``int8`` extra; with ``predict_engine: eager``).
            Both change a few labels: BENCHMARKS.md gives their mIoU change on trained weights.
        crf_rnn: Put a trainable dense CRF after the network (CRF-as-RNN, Zheng et al. 2015;
            :class:`~deeplab_lit.crf.trainable.CRFasRNN`), e.g. ``{"iterations": 5}``: in training the
            loss is taken on its output, and validation/test log the network's scores (``val/mIoU``)
            and the CRF's (``val/mIoU_crf_rnn``) side by side; predict returns the CRF's output. Keys:
            the layer's (``preset``, ``iterations``, ``eval_iterations``, ``learn_bandwidths``),
            ``network_loss_weight`` (0: a second loss on the network's own logits) and ``lr_mult``
            (the CRF's learning rate ``lr * lr_mult``, no weight decay); see
            :mod:`~deeplab_lit.modules.trainable_crf`. It needs the raw images, recovered through the
            input normalisation (the data's or the weights'). None (default): no trainable CRF, unless
            ``weights`` hold one (a checkpoint trained with it): then its options and parameters are
            taken, since the CRF is part of what those weights compute.
        loss: The training objective, ``{"class_path": ..., "init_args": {...}}`` (see
            :mod:`deeplab_lit.losses`: ``CrossEntropy`` with class weights or bootstrapping,
            ``OHEMCrossEntropy``, ``LovaszSoftmax``, ``Sum``; or any ``nn.Module`` called as
            ``loss(logits, masks, step)``). Training, validation and test all use it, on every output
            (MSC scales, ``aux*`` at ``aux_weight``, the trainable CRF's). ``ignore_index`` and
            ``num_classes`` are passed to it where its ``__init__`` takes them. ``class_weights: auto``
            is counted once at ``setup`` from the data module's preflight and kept in checkpoints. None
            (default): plain mean cross-entropy over the labelled pixels, the papers' loss.

    The optimiser is SGD with torch's fused kernel where every parameter's device has one (CPU, CUDA),
    else its multi-tensor (``foreach``) kernel; see :func:`~deeplab_lit.acceleration.fast_sgd_options`.
    """

    #: The builder of this version's network (:data:`~deeplab_lit.models.deeplab.BUILDERS`), named once by
    #: each version class; :meth:`build_model` passes it the hyper-parameters its signature accepts.
    builder: ClassVar[Callable[..., nn.Module] | None] = None

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        pretrained_backbone: bool | str = False,
        weights: str | None = None,
        reinit_classifier: bool = False,
        lr: float = 0.007,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        head_lr_mult: float = 10.0,
        freeze_bn: bool = False,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        inference: InferenceConfig = InferenceConfig(),
        class_names: list[str] | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        fuse_bn_for_inference: bool = True,
        predict_engine: str = "eager",
        predict_precision: str = "fp32",
        crf_rnn: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        compile_mode(compile)  # a mode name that torch.compile would reject fails here, before building
        check_engine(predict_engine)  # and an engine that cannot run here
        check_precision(predict_precision, predict_engine)  # and a precision it cannot run
        self.save_hyperparameters()
        #: The one loss of training, validation and test (``loss``); its state (auto class weights) is saved.
        self.criterion = build_loss(loss, ignore_index, num_classes)
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.inference_config = inference
        checkpoint = read_checkpoint(weights) if weights is not None else None
        if checkpoint is not None:
            self._adopt_weights_options(checkpoint)
        self.model = self.build_model()
        #: The trainable CRF after the network (``crf_rnn``), or None.
        self.crf_rnn, self.crf_rnn_options = build_trainable_crf(
            self.hparams["crf_rnn"], self.hparams["num_classes"]
        )
        #: Input normalisation the weights need: the checkpoint's, else the data's (adopted at ``setup``).
        self.normalization: Normalization | None = None
        if checkpoint is not None:
            info = load_weights(
                self.model, checkpoint, num_classes=num_classes, reinit_classifier=reinit_classifier
            )
            self.normalization = info.normalization
            self._load_trained_crf(checkpoint, reinit_classifier)
        self._prepare_network()
        suffixes = [""] if self.crf_rnn is None else ["", CRF_RNN_SUFFIX]
        self.metrics = nn.ModuleDict(
            {s + x: SegmentationMetrics(num_classes, ignore_index) for s in STAGES for x in suffixes}
        )
        # The folded copy predict uses; in a dict so that it is no registered submodule (no state-dict keys).
        self._folded: dict[str, Model] = {}
        self._predict_channels_last = False  # the folded copy is NHWC: its input is made so too

    def _prepare_network(self) -> None:
        """Freeze the backbone's BatchNorm (``freeze_bn``), then channels-last and compile (accelerate)."""
        if self.hparams["freeze_bn"]:
            for module in self.backbone_modules():
                if isinstance(module, BATCHNORMS):
                    module.requires_grad_(False)
            self.train(self.training)  # frozen BatchNorm starts in eval mode
        accelerate(self.model, channels_last=self.hparams["channels_last"], compile=self.hparams["compile"])

    def build_model(self) -> nn.Module:
        """Build the network: :attr:`builder` with the hyper-parameters it accepts, ImageNet-initialised.

        :func:`~deeplab_lit.weights.imagenet.build_network` applies ``pretrained_backbone``.

        Override it for a network no builder makes; it must offer ``forward`` and ``forward_train``.
        """
        builder = type(self).builder  # through the class: a plain function, not a method bound to self
        if builder is None:
            raise TypeError(
                f"{type(self).__name__} names no builder: set the class attribute builder (e.g. "
                "builder = deeplab_lit.models.deeplab_v3) or override build_model"
            )
        return build_network(builder, self.hparams)

    # -------------------------------------------------------------------------- weights, normalisation
    def _adopt_weights_options(self, checkpoint: Checkpoint) -> None:
        """Take the architecture options ``checkpoint`` implies wherever ``__init__`` kept its default."""
        defaults = class_defaults(type(self))
        changes = resolve_options(checkpoint, dict(self.hparams), defaults, version=type(self))
        if checkpoint.crf_rnn is not None and self.hparams.get("crf_rnn") is None:
            # the weights' model ends in a trained CRF: it is part of what they compute
            changes["crf_rnn"] = dict(checkpoint.crf_rnn["options"])
        if changes:
            rank_zero_info(f"Options taken from the weights ({checkpoint.description}): {changes}")
            self.hparams.update(changes)

    def _load_trained_crf(self, checkpoint: Checkpoint, reinit_classifier: bool) -> None:
        """Load the trained CRF the weights hold into ``crf_rnn`` (whose options were adopted if unset)."""
        if checkpoint.crf_rnn is None or self.crf_rnn is None:
            return
        if reinit_classifier:  # its compatibility matrix is per class, like the classifier
            rank_zero_info("reinit_classifier: the weights' trained CRF is not loaded; crf_rnn starts afresh")
            return
        try:
            self.crf_rnn.load_state_dict(checkpoint.crf_rnn["state"])
        except RuntimeError as err:
            raise ValueError(
                f"The trained CRF in {checkpoint.description} does not fit this module's crf_rnn "
                f"({self.crf_rnn.num_classes} classes): {err}. Pass reinit_classifier=true to start the CRF "
                "afresh, or drop crf_rnn."
            ) from err

    def _check_normalization(self) -> None:
        """Raise if the data's normalisation differs from the weights'; adopt the data's if none is known."""
        given = getattr(getattr(self._trainer, "datamodule", None), "normalization", None)
        if not isinstance(given, Normalization):
            return
        if self.normalization is None:
            self.normalization = given
        elif given != self.normalization:
            wanted = json.dumps(self.normalization.to_dict())
            raise ValueError(
                f"The model's weights ({self.hparams.get('weights') or 'checkpoint'}) expect inputs "
                f"normalised as {self.normalization} but the data module normalises as {given}. Set "
                f"data.init_args.normalization to {wanted} in the config "
                f"(command line: --data.init_args.normalization '{wanted}')."
            )

    def setup(self, stage: str) -> None:
        """Check the data's normalisation against the weights'; count ``"auto"`` class weights."""
        self._check_normalization()
        self._count_class_weights()

    def _count_class_weights(self) -> None:
        """Fill the loss's ``"auto"`` class weights from the data module's class counts, once.

        Counted by the preflight over the training split; weights a checkpoint already holds are kept.
        """
        pending = [
            m for m in self.criterion.modules() if isinstance(m, ClassWeighted) and m.needs_class_counts
        ]
        if not pending:
            return
        counts = getattr(getattr(self._trainer, "datamodule", None), "class_counts", None)
        if counts is None:
            raise ValueError(
                "class_weights: auto needs the training split's class counts, which the data module's "
                "preflight gathers at setup: use a deeplab_lit data module with preflight: true (fit), "
                "evaluate a checkpoint that holds the weights, or give class_weights as a list"
            )
        for module in pending:
            absent = module.set_class_counts(counts.pixels, counts.image_pixels)
            assert module.class_weight is not None
            listed = ", ".join(f"{n}={w:.3g}" for n, w in zip(self.class_names, module.class_weight.tolist()))
            rank_zero_info(f"Class weights (median frequency over the training split): {listed}")
            if absent:
                names = [self.class_names[c] for c in absent]
                rank_zero_warn(f"Classes absent from the training split get class weight 1: {names}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the input normalisation; the weights are in the state dict, so drop the ``weights`` path."""
        checkpoint["normalization"] = self.normalization.to_dict() if self.normalization else None
        hyper_parameters = checkpoint.get("hyper_parameters")
        if isinstance(hyper_parameters, dict) and hyper_parameters.get("weights"):
            checkpoint["weights_source"] = hyper_parameters["weights"]
            hyper_parameters["weights"] = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Match the network to the checkpoint's layout, restore its input normalisation, check the data's."""
        self._match_separable_form(checkpoint.get("state_dict") or {})
        if checkpoint.get("normalization"):
            self.normalization = Normalization(**checkpoint["normalization"])
            self._check_normalization()

    def _match_separable_form(self, state: dict[str, Any]) -> None:
        """Rebuild the network in the separable form the checkpoint's keys show, where it differs.

        v3+ checkpoints saved before ``separable_form`` existed hold the ``"deeplab"`` form without saying
        so. Lightning's ``load_from_checkpoint`` builds the module from the saved hyper-parameters (then
        today's default form) and calls this hook before loading the state, which would not fit. (The
        CLI's ``--ckpt_path`` and ``weights:`` read the form before building.)
        """
        if not self.hparams.get("separable") or "separable_form" not in self.hparams:
            return
        layout = separable_options(key[len("model.") :] for key in state if key.startswith("model."))
        form = (layout or {}).get("separable_form")
        if form is None or form == self.hparams["separable_form"]:
            return
        rank_zero_info(f"The checkpoint's separable convolutions are of form {form!r}: rebuilt in it")
        self.hparams["separable_form"] = form
        self.model = self.build_model()
        self._prepare_network()

    def backbone_modules(self) -> list[nn.Module]:
        """Modules of the (ImageNet-initialised) backbone, which train at the base learning rate."""
        return [m for name, m in self.model.named_modules() if ".backbone." in f".{name}."]

    def forward(self, images: Tensor) -> Tensor:
        """Logits (N, C, H, W) at the input's size for normalised images (N, 3, H, W), after ``crf_rnn``."""
        return self._refine(self.model(images), images)

    def _refine(self, logits: Tensor, images: Tensor) -> Tensor:
        """The trainable CRF's output on ``logits`` (the network's, at the images' size); as is without it."""
        if self.crf_rnn is None:
            return logits
        if self.normalization is None:
            raise ValueError(
                "crf_rnn needs the raw RGB images, recovered through the input normalisation, and none is "
                "known: train with a deeplab_lit data module (it provides one), load weights that record "
                "one, or set module.normalization = deeplab_lit.normalization.Normalization(...)"
            )
        return self.crf_rnn(logits, self.normalization.denormalize(images))

    def train(self, mode: bool = True) -> SegmentationModule:
        """Switch train/eval mode, keeping frozen BatchNorm layers in eval mode."""
        super().train(mode)
        if mode and self.hparams["freeze_bn"]:
            for module in self.backbone_modules():
                if isinstance(module, BATCHNORMS):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------- loss
    def compute_loss(self, outputs: dict[str, Tensor], masks: Tensor) -> Tensor:
        """The loss summed over the outputs (MSC scales at weight 1, ``aux*`` at ``aux_weight``)."""
        total = masks.new_zeros((), dtype=torch.float32)
        for name, logits in outputs.items():
            weight = self.hparams["aux_weight"] if name.startswith("aux") else 1.0
            if name == NETWORK_OUTPUT:
                weight = self.crf_rnn_options.network_loss_weight
            total = total + weight * self.criterion(logits.float(), masks, self.global_step)
        return total

    # ---------------------------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One iteration: every output of ``forward_train`` against the mask."""
        images, masks = batch["image"], batch["mask"]
        # build_model may return any nn.Module with forward_train, an attribute torch types Tensor | Module
        outputs = self.model.forward_train(images)  # type: ignore[operator]
        if self.crf_rnn is not None:
            if self.crf_rnn_options.network_loss_weight:
                outputs[NETWORK_OUTPUT] = outputs["out"]
            outputs["out"] = self._refine(outputs["out"], images)
        loss = self.compute_loss(outputs, masks)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        images, masks = batch["image"], batch["mask"]
        logits = segment(self.model, images, self.inference_config)
        loss = self.criterion(logits.float(), masks, self.global_step)
        preds = logits.argmax(dim=1)
        self._metrics(stage).update(preds, masks)
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=images.shape[0], sync_dist=True
        )
        if self.crf_rnn is None:
            return {"logits": logits, "preds": preds}
        refined = self._refine(logits, images)
        self._metrics(stage + CRF_RNN_SUFFIX).update(refined.argmax(dim=1), masks)
        loss = self.criterion(refined.float(), masks, self.global_step)
        self.log(
            f"{stage}/loss{CRF_RNN_SUFFIX}",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=images.shape[0],
            sync_dist=True,
        )
        return {"logits": logits, "preds": preds, "logits" + CRF_RNN_SUFFIX: refined}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Whole-image inference; returns ``{"logits", "preds"}`` for callbacks (e.g. the dense CRF).

        With ``crf_rnn``, ``"logits"`` stays the network's (the offline CRF refines those) and the
        trainable CRF's output is added as ``"logits_crf_rnn"``.
        """
        return self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Logits and labels of a batch of images (after ``crf_rnn``), its names/paths passed through."""
        images = batch["image"]
        if self._predict_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = segment(self._folded.get("model", self.model), images, self.inference_config)
        logits = self._refine(logits, batch["image"])
        extras = {k: v for k, v in batch.items() if k != "image"}
        return {"logits": logits, "preds": logits.argmax(dim=1), **extras}

    def on_predict_start(self) -> None:
        """Build what predict runs: the folded copy under ``predict_engine`` and ``predict_precision``.

        See :mod:`deeplab_lit.engines` and :mod:`deeplab_lit.precision`; int8 calibrates here, on the data
        module's ``calibration_path`` images.
        """
        engine = self.hparams.get("predict_engine", "eager")  # checkpoints from before the options: eager,
        precision = self.hparams.get("predict_precision", "fp32")  # fp32
        if (engine, precision) == ("eager", "fp32") and not self.hparams.get("fuse_bn_for_inference"):
            return
        network, self._predict_channels_last = predict_network(
            self.model, engine, self.device, precision, self._calibration_images
        )
        self._folded["model"] = network

    def _calibration_images(self) -> Iterable[Tensor]:
        """int8's calibration images: the data module's (``calibration_path``), normalised, one at a time."""
        datamodule = getattr(self.trainer, "datamodule", None)  # Trainer.datamodule: untyped property
        images = getattr(datamodule, "calibration_images", None)
        if images is None:
            raise ValueError(
                "predict_precision='int8' calibrates on the data module's calibration_path images; this "
                "predict has no deeplab-lit data module (Trainer.predict(datamodule=...) gives it one)"
            )
        path = getattr(datamodule, "calibration_path", None)
        rank_zero_info(
            f"predict_precision=int8: calibrating on the images of {path}, then "
            "lowering to oneDNN's int8 kernels once per image size (seconds to a minute each on a CPU)"
        )
        return cast(Iterable[Tensor], images())

    def on_predict_end(self) -> None:
        """Drop the folded copy."""
        self._folded.clear()
        self._predict_channels_last = False

    def _metrics(self, stage: str) -> SegmentationMetrics:
        """Return the metrics of ``stage`` (``nn.ModuleDict`` types its values as plain modules)."""
        return cast(SegmentationMetrics, self.metrics[stage])

    def _log_epoch_scores(self, stage: str) -> None:
        for suffix in ("", CRF_RNN_SUFFIX) if self.crf_rnn is not None else ("",):
            scores = self._metrics(stage + suffix).compute()
            self.log_dict(
                {f"{stage}/{key}{suffix}": scores[key] for key in ("mIoU", "pixel_acc", "mean_acc")},
                prog_bar=stage == "val",
            )
            per_class = {
                f"{stage}/IoU{suffix}/{name}": iou
                for name, iou in zip(self.class_names, scores["iou"])
                if not iou.isnan()
            }
            self.log_dict(per_class)
            self._metrics(stage + suffix).reset()

    def on_validation_epoch_end(self) -> None:
        """Log mIoU, pixel accuracy, mean accuracy and per-class IoU over the whole validation set."""
        self._log_epoch_scores("val")

    def on_test_epoch_end(self) -> None:
        """As :meth:`on_validation_epoch_end`, for the test set."""
        self._log_epoch_scores("test")

    # ------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SGD with a 10x head learning rate and the per-iteration poly schedule."""
        backbone_ids = {id(p) for m in self.backbone_modules() for p in m.parameters(recurse=False)}
        backbone: list[nn.Parameter] = []
        head: list[nn.Parameter] = []
        for param in self.model.parameters():
            if param.requires_grad:
                (backbone if id(param) in backbone_ids else head).append(param)
        hp = self.hparams
        groups = [{"params": backbone, "lr": hp["lr"]}, {"params": head, "lr": hp["lr"] * hp["head_lr_mult"]}]
        crf: list[nn.Parameter] = []
        if self.crf_rnn is not None:  # own group, no weight decay (see deeplab_lit.modules.trainable_crf)
            crf = [p for p in self.crf_rnn.parameters() if p.requires_grad]
            groups.append({"params": crf, "lr": hp["lr"] * self.crf_rnn_options.lr_mult, "weight_decay": 0.0})
        # fp16 loss scaling skips steps, which the fused SGD mishandles (see fast_sgd_options): foreach then.
        fused_allowed = str(self.trainer.precision) not in ("16-mixed", "16")
        optimizer = torch.optim.SGD(
            [g for g in groups if g["params"]],
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
            **fast_sgd_options(backbone + head + crf, fused_allowed),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=total_steps, power=hp["poly_power"]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Note the optimiser options just configured, before Lightning restores a checkpoint's over them."""
        configs = self.trainer.lr_scheduler_configs
        self._configured = [
            options_of(optimizer, configs[i].scheduler if i < len(configs) else None)
            for i, optimizer in enumerate(self.trainer.optimizers)
        ]

    def on_train_start(self) -> None:
        """On resume, apply today's optimiser and schedule options to the restored state, saying what changed.

        See :mod:`deeplab_lit.modules.schedule` (a longer run re-plans the poly schedule; a new lr applies).
        """
        if not self.trainer.ckpt_path:
            return
        configs = self.trainer.lr_scheduler_configs
        for i, (optimizer, fresh) in enumerate(zip(self.trainer.optimizers, self._configured, strict=False)):
            line = apply_options(optimizer, configs[i].scheduler if i < len(configs) else None, fresh)
            if line:
                rank_zero_info(line)
