"""Exact and safe resumption: an up-to-date ``last.ckpt``, random-number state in it, atomic writes.

Lightning alone resumes less than it seems: with ``monitor: val/mIoU`` its ``save_last`` refreshes
``last.ckpt`` only when the score improved, it restores no random number generator, and its writes are
atomic only when the system temporary folder is on the checkpoint's file system. One class for each:

- :class:`BestAndLastCheckpoint`: ``last.ckpt`` always the newest state (the CLI's ``checkpoint`` callback);
- :class:`RandomStateCheckpoint`: the generators the training loop draws from, saved and restored (with
  what a resumed run reproduces exactly, and what not);
- :class:`AtomicCheckpointIO`: a temporary file renamed over the target, and a clear error on a full disk.

Signals (Ctrl-C, SIGTERM, SIGUSR1) end a fit in a mid-epoch ``last.ckpt`` through
:class:`~deeplab_lit.callbacks.interrupt.InterruptCheckpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from deeplab_lit.weights.formats import read_weights_file

# Lightning's own warning for an absent "last" checkpoint hints at save_last, which this project always sets;
# BestAndLastCheckpoint._find_last_checkpoints says what happened instead.
warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for the best files, with ``last.ckpt`` refreshed at every validation.

    Since Lightning 2.2, ``save_last=True`` writes ``last.ckpt`` only "whenever a checkpoint file gets
    saved", i.e. with ``monitor: val/mIoU`` only when the score improved: a run that stops improving keeps
    an old ``last.ckpt`` and ``--ckpt_path last`` would silently go back to its last improvement.

    Same arguments as ``ModelCheckpoint``. With ``save_last=True``, ``last.ckpt`` is written by a second,
    plain ``ModelCheckpoint`` (``filename="last"``, no monitor, top 1, the same folder, file system,
    ``save_weights_only``, ``save_on_train_epoch_end`` and ``enable_version_counter``) that this one
    drives through its public hooks: so every validation (or training-epoch end, when that is where
    this callback saves) leaves ``last.ckpt`` at the current step, whatever the score, and Lightning's
    own ``save_last`` (a copy only when a best file is written) is off (``save_last`` reads False).
    ``last_model_path`` is that file. ``save_last="link"`` is Lightning's (a link to the newest best
    file). The schedule is the default one, every validation: ``every_n_train_steps`` or
    ``train_time_interval`` steer the best files only. ``--ckpt_path last`` without any ``last*.ckpt`` is
    an error (Lightning warns and trains from scratch).
    """

    def __init__(self, **kwargs: Any) -> None:
        """Take ``ModelCheckpoint``'s arguments, by name (see the class doc)."""
        options = inspect.signature(ModelCheckpoint).bind(**kwargs)
        options.apply_defaults()
        newest = options.arguments["save_last"] is True
        if newest:
            kwargs["save_last"] = False
        self._newest: ModelCheckpoint | None = None  # before super().__init__, which sets last_model_path
        self._newest_step = -1  # the global step of the newest last.ckpt this run wrote
        self._last_model_path = ""
        super().__init__(**kwargs)
        if newest:
            self._newest = ModelCheckpoint(
                dirpath=options.arguments["dirpath"],
                filename=self.CHECKPOINT_NAME_LAST,
                save_weights_only=options.arguments["save_weights_only"],
                save_on_train_epoch_end=options.arguments["save_on_train_epoch_end"],
                enable_version_counter=options.arguments["enable_version_counter"],
            )

    @property  # an attribute in ModelCheckpoint
    def last_model_path(self) -> str:
        """The newest ``last.ckpt`` this callback wrote (or the resumed run's), ``""`` before the first."""
        return self._newest.best_model_path if self._newest is not None else self._last_model_path

    @last_model_path.setter
    def last_model_path(self, path: str) -> None:
        self._last_model_path = path

    # ModelCheckpoint's hooks, each passed on to the last.ckpt checkpoint after the best files' turn
    # (tests/callbacks/test_resume.py checks that no hook ModelCheckpoint implements is left out).
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the folder, then give it to the ``last.ckpt`` checkpoint too."""
        super().setup(trainer, pl_module, stage)
        if self._newest is not None:
            self._newest.dirpath = self.dirpath
            self._newest.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start both checkpoints' clocks."""
        super().on_train_start(trainer, pl_module)
        if self._newest is not None:
            self._newest.on_train_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Step-triggered best files; the ``last.ckpt`` checkpoint has no step trigger."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._pass_on("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Best files, then ``last.ckpt``, when this is where the callback saves."""
        super().on_train_epoch_end(trainer, pl_module)
        self._pass_on("on_train_epoch_end", trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Best files, then ``last.ckpt``, when this is where the callback saves."""
        super().on_validation_end(trainer, pl_module)
        self._pass_on("on_validation_end", trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """``save_on_exception`` is the best files' option."""
        super().on_exception(trainer, pl_module, exception)
        self._pass_on("on_exception", trainer, pl_module, exception)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pass the end of training on; leave ``last.ckpt`` at the final step.

        A run that stops between validations (``max_steps`` inside an epoch, ``max_time``) would otherwise
        end with ``last.ckpt`` at the previous validation (or none): ``--ckpt_path last`` must resume from
        where the run stopped. Written through the trainer's public ``save_checkpoint`` (atomic with
        :class:`AtomicCheckpointIO`).
        """
        super().on_train_end(trainer, pl_module)
        if self._newest is None:
            return
        self._pass_on("on_train_end", trainer, pl_module)
        if trainer.global_step > 0 and self._newest_step != trainer.global_step:
            path = self._newest.best_model_path or os.path.join(
                str(self._newest.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
            )
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)
            self._newest.best_model_path = path
            self._newest_step = trainer.global_step

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        """Lightning's top-k test, and never true for weights holding NaN or inf.

        A diverged run without :class:`~deeplab_lit.callbacks.NonFiniteLossGuard` (a config or Python
        script that lacks it) can still score a finite mIoU (one class everywhere): its checkpoint must not
        become a "best" file that the run summary offers for predict. ``last.ckpt`` still records it.
        """
        if not super().check_monitor_top_k(trainer, current):
            return False
        if _finite_weights(trainer.lightning_module):
            return True
        rank_zero_warn(
            f"The weights at global step {trainer.global_step} hold NaN or inf: not saved as a best "
            f"checkpoint ({self.monitor}={current}). Training diverged; see NonFiniteLossGuard."
        )
        return False

    def _pass_on(self, hook: str, trainer: Trainer, *args: Any) -> None:
        """Call the ``last.ckpt`` checkpoint's ``hook``; remember the step when it wrote its file."""
        if self._newest is None:
            return
        before = _file_version(self._newest.best_model_path)
        getattr(self._newest, hook)(trainer, *args)
        if _file_version(self._newest.best_model_path) != before:
            self._newest_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state, with the ``last.ckpt`` checkpoint's under ``"newest"``."""
        state = super().state_dict()
        if self._newest is not None:
            state["newest"] = self._newest.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both; a checkpoint from before the split names its ``last.ckpt`` in ``last_model_path``."""
        super().load_state_dict(state_dict)
        if self._newest is None:
            return
        if "newest" in state_dict:
            self._newest.load_state_dict(state_dict["newest"])
        elif state_dict.get("dirpath", self.dirpath) == self.dirpath:  # so the resumed run overwrites it
            self._newest.best_model_path = state_dict.get("last_model_path", "")

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """Return the ``last*.ckpt`` files for ``ckpt_path="last"``, saying plainly when there is none.

        Lightning calls this private method only to resolve ``ckpt_path="last"`` and, when it finds
        nothing, warns with a hint about ``save_last`` that does not apply here. ``fit`` then starts a
        new run, on purpose, so that a cluster script can always pass ``--ckpt_path last`` (the first
        submission starts, a requeued one resumes): this says so, naming the folder that was searched.
        ``validate``/``test``/``predict`` have nothing to evaluate without a checkpoint: a
        FileNotFoundError naming the folder.

        Private on purpose: no public hook sees ``ckpt_path="last"`` before Lightning resolves it
        (``trainer.ckpt_path`` is then None, as without any checkpoint). Checked in lightning 2.6.6, the
        installed one; the upper bound on lightning in pyproject.toml covers it.
        """
        found = super()._find_last_checkpoints(trainer)
        if found or _other_last_checkpoints(trainer, self):
            return found
        folder = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        missing = (
            f"--ckpt_path last: there is no {self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION} (nor "
            f"{self.CHECKPOINT_NAME_LAST}-v<n>{self.FILE_EXTENSION}) in {folder}: "
            "no earlier run wrote one there"
        )
        if trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                f"{missing}. Starting a new run from step 0. (To resume another run, give its checkpoint "
                "file or set trainer.default_root_dir to its folder.)"
            )
            return found
        raise FileNotFoundError(f"{missing}. Give a checkpoint file instead (--ckpt_path path/to/file.ckpt).")


def _finite_weights(module: torch.nn.Module) -> bool:
    """Whether every floating-point tensor of ``module``'s state is finite (one host read)."""
    flags = [t.isfinite().all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _file_version(path: str) -> tuple[str, int] | None:
    """``(path, modification time in ns)`` of an existing file, else None: tells a rewrite apart."""
    try:
        return path, os.stat(path).st_mtime_ns
    except OSError:
        return None


def _other_last_checkpoints(trainer: Trainer, this: ModelCheckpoint) -> bool:
    """Whether another checkpoint callback offers a file for ``ckpt_path="last"`` (as Lightning counts)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set undeclared by Lightning's connector
        if isinstance(callback, OnExceptionCheckpoint) and os.path.exists(callback.ckpt_path):
            return True
        if isinstance(callback, ModelCheckpoint) and callback is not this:
            if ModelCheckpoint._find_last_checkpoints(callback, trainer):
                return True
    return False


class RandomStateCheckpoint(Callback):
    """Save the random generators' states in every checkpoint and restore them when training resumes.

    The generators: Python's ``random``, NumPy's global state, torch's CPU and CUDA generators (data order
    of the shuffling sampler, dropout, worker seeds) and the albumentations pipeline of the training set
    when it runs in the main process (``num_workers=0``). Lightning restores weights, optimiser, schedule
    and loop counters but not these, so without it a resumed run draws the next epoch's order and
    augmentations from the start-of-run seed.

    Add it to ``trainer.callbacks``; it has no options. The state is the one of the process that writes
    the checkpoint (global rank 0) and is restored on every process.

    What is exact (tests/integration/test_resume.py): a run SIGKILLed at any moment and resumed with
    ``--ckpt_path last`` from a checkpoint written at the end of an epoch (its length in ``max_epochs`` or
    in ``max_steps``) finishes with the same step count, weights and metrics as an uninterrupted run, on
    the CPU with ``deterministic: true`` and augmentation in the main process (``num_workers=0``).
    Lightning first repeats the validation that wrote the checkpoint (same figures, logged once more).
    What is not exact: DataLoader workers with ``persistent_workers=True`` (the datamodules' choice
    whenever ``num_workers > 0``) keep their augmentation state in other processes, which no checkpoint
    reaches; and a checkpoint written in the middle of an epoch (``val_check_interval`` or
    ``every_n_train_steps``, as in the paper configs, or by an interrupt) resumes with the right step
    count, schedule and optimiser state, but Lightning starts that epoch's data loader afresh (it warns
    about a non-resumable loader), so the rest of that epoch sees a new shuffle: statistically the same
    training, not the same bits.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Trainer | None = None
        self._loaded: dict[str, Any] | None = None  # the restored state, until the first training batch

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remember the trainer, to reach the training set's augmentation."""
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Return the generators' states now (called while a checkpoint is written)."""
        return {
            "python": random.getstate(),
            # numpy's stub types get_state() as legacy=False's dict; its default (legacy=True) gives the tuple
            "numpy": _numpy_state_to_plain(np.random.get_state()),  # type: ignore[arg-type]
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "augmentation": [_get_pipeline_state(p) for p in self._pipelines()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called when ``fit`` resumes from a checkpoint)."""
        self._loaded = state_dict
        self._restore(state_dict)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """From the first training batch on, the generators run on from the restored state."""
        self._loaded = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the checkpoint's state again when the epoch after it opens a new data loader iterator.

        The uninterrupted run draws the new epoch's worker base seed and shuffle from the state the
        checkpoint holds. Lightning opens the training iterator once in its data setup, right after the
        restore, and reuses it for the next epoch, except when it restarts the checkpoint's finished epoch
        (always with ``max_steps``: iteration-based training), which uses up that iterator; the next epoch
        then opens another one, one draw later, and the whole run would differ (issue 20, case 1). Reads
        the loops' public ``is_resuming``/``restarting`` properties; Lightning's own test of the same
        condition is in ``_TrainingEpochLoop.on_run_start`` (checked in 2.6, pyproject's bound).
        """
        fit_loop = trainer.fit_loop
        new_iterator = (
            trainer.current_epoch > 0 and not fit_loop.is_resuming and not fit_loop.epoch_loop.restarting
        )
        if self._loaded is not None and new_iterator:
            self._restore(self._loaded)
        self._loaded = None

    def _restore(self, state_dict: dict[str, Any]) -> None:
        """Set every generator to ``state_dict`` (see :meth:`state_dict`)."""
        random.setstate(state_dict["python"])
        np.random.set_state(_numpy_state_from_plain(state_dict["numpy"]))
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        saved = state_dict.get("augmentation", [])
        pipelines = self._pipelines()
        if len(saved) != len(pipelines):
            rank_zero_warn(
                f"RandomStateCheckpoint: the checkpoint holds {len(saved)} augmentation states but the "
                f"training set has {len(pipelines)} pipelines; their random state is not restored"
            )
            return
        for pipeline, state in zip(pipelines, saved):
            _set_pipeline_state(pipeline, state)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say when a resumed run cannot be bit-identical (persistent DataLoader workers)."""
        loader = trainer.train_dataloader
        persistent = getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0
        if trainer.ckpt_path and persistent:
            rank_zero_warn(
                "Resuming with persistent DataLoader workers: their augmentation random state lives in the "
                "worker processes and is not in the checkpoint, so the resumed run is statistically "
                "equivalent but not bit-identical to an uninterrupted one (use num_workers=0 for that)."
            )

    def _pipelines(self) -> list[Any]:
        """Return the albumentations ``Compose`` objects of the training set(s) that run in this process."""
        datamodule = getattr(self._trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        datasets = list(getattr(dataset, "datasets", [dataset]))  # ConcatDataset or one dataset
        pipelines = [getattr(getattr(d, "transform", None), "pipeline", None) for d in datasets]
        return [p for p in pipelines if hasattr(p, "set_random_state") and hasattr(p, "random_generator")]


def _numpy_state_to_plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """NumPy's legacy state with its key array as a tensor, so ``torch.load(weights_only=True)`` reads it."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached


def _numpy_state_from_plain(state: tuple[Any, ...]) -> tuple[Any, ...]:
    name, keys, position, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), position, has_gauss, cached


def _augment_objects(pipeline: Any) -> list[Any]:
    """Return the pipeline and every transform inside it (each may hold its own generators)."""
    objects = [pipeline]
    for transform in getattr(pipeline, "transforms", []):
        objects += _augment_objects(transform)
    return objects


def _get_pipeline_state(pipeline: Any) -> dict[str, Any]:
    """States of the distinct NumPy and Python generators of a pipeline, and which object uses which."""
    numpy_gens: list[Any] = []
    python_gens: list[Any] = []

    def index(pool: list[Any], item: Any) -> int:
        for position, known in enumerate(pool):
            if known is item:
                return position
        pool.append(item)
        return len(pool) - 1

    links = [
        (index(numpy_gens, o.random_generator), index(python_gens, o.py_random))
        for o in _augment_objects(pipeline)
    ]
    return {
        "numpy": [g.bit_generator.state for g in numpy_gens],
        "python": [g.getstate() for g in python_gens],
        "links": links,
    }


def _set_pipeline_state(pipeline: Any, state: dict[str, Any]) -> None:
    objects = _augment_objects(pipeline)
    if len(objects) != len(state["links"]):
        raise ValueError(
            f"the checkpoint's augmentation state covers {len(state['links'])} transforms, the training "
            f"pipeline has {len(objects)}: was the augmentation changed between the runs?"
        )
    numpy_gens = []
    for saved in state["numpy"]:
        generator = np.random.default_rng()
        generator.bit_generator.state = saved
        numpy_gens.append(generator)
    python_gens = []
    for saved in state["python"]:
        python_generator = random.Random()
        python_generator.setstate(saved)
        python_gens.append(python_generator)
    for obj, (numpy_index, python_index) in zip(objects, state["links"]):
        obj.random_generator, obj.py_random = numpy_gens[numpy_index], python_gens[python_index]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partly written checkpoint under the target name.

    Local paths: ``torch.save`` streams into a temporary file in the target's folder (named
    ``.<name>.<random>.tmp``, which no ``last``/``best`` lookup matches), which is flushed to disk and
    renamed over the target (``os.replace``, atomic on POSIX and Windows). A failure or a kill at any
    moment leaves either the old or the new file, never a mix; a kill may leave the hidden temporary file
    behind. Remote paths (``s3://``...) use Lightning's implementation. Lightning's own
    ``TorchCheckpointIO`` is atomic only when the system temporary folder is on the checkpoint's file
    system (fsspec writes to ``tempfile.mkstemp()`` and moves the file, which becomes a copy across
    devices), and it holds the serialised checkpoint in memory twice. A full disk (or quota) raises
    :class:`CheckpointWriteError` naming the file, the free space and the checkpoint's size, instead of
    torch's ``inline_container.cc`` message with the cause buried above it.

    Reading: every checkpoint Lightning reads through it (``--ckpt_path`` files, ``last``, ``hpc`` and
    SLURM's auto-resume ``hpc_ckpt_<n>.ckpt``) goes through the project's safe reader
    (:func:`~deeplab_lit.weights.formats.read_weights_file`: ``torch.load(weights_only=True)``
    with this project's config classes declared safe), whatever ``weights_only`` Lightning passes and
    whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says (some clusters set it; it turns Lightning's
    default load into full unpickling, which runs any code a crafted file holds). A file holding other
    Python objects raises :class:`~deeplab_lit.weights.formats.UnsafeCheckpointError`.

    Use it as ``trainer.plugins: [{class_path: deeplab_lit.callbacks.AtomicCheckpointIO}]``; the CLI adds
    it when a config names no checkpoint plugin.
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read ``path`` with the safe reader only (see the class docstring).

        ``map_location`` and ``weights_only`` are ignored: tensors are read to the CPU (Lightning moves
        them) and never with full unpickling.

        Raises:
            FileNotFoundError: no such file (Lightning's wording).
            UnsafeCheckpointError: the file holds Python objects other than tensors and plain containers.
            ValueError: the file is truncated, corrupt or not a checkpoint.
        """
        if not isinstance(get_filesystem(path), LocalFileSystem):  # s3://...: Lightning's reader, made safe
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint = read_weights_file(Path(path))
        if not isinstance(checkpoint, dict):
            raise ValueError(
                f"Checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint"
            )
        return checkpoint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring)."""
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600; match a normally created file
            os.replace(temporary, target)
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            full = _disk_full(error)
            if full is not None:
                raise CheckpointWriteError(full.errno, _disk_full_message(target, checkpoint, full)) from None
            raise
        _fsync_folder(target.parent)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written because its disk (or quota) is full; the previous file is intact."""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full(error: BaseException) -> OSError | None:
    """Return the "no space left" (or quota) ``OSError`` in ``error`` or the exceptions behind it.

    ``torch.save`` reports a failed write as a ``RuntimeError`` from ``inline_container.cc`` raised while
    handling the ``OSError`` (and closing the file raises that ``OSError`` again), so the chain is walked.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        pending += [current.__cause__, current.__context__]
    return None


def _disk_full_message(target: Path, checkpoint: dict[str, Any], error: OSError) -> str:
    """One message naming the file, the free space and the checkpoint's approximate size."""
    free = shutil.disk_usage(target.parent).free  # after the partial temporary file was removed
    kept = f"The previous {target.name} is intact." if target.exists() else f"No {target.name} was written."
    needed = _human(_tensor_bytes(checkpoint))
    return (
        f"Cannot write checkpoint {target}: {error.strerror or 'disk full'} ({_human(free)} free in "
        f"{target.parent}; the checkpoint needs about {needed}). {kept} Free some space or write the "
        "checkpoints to another disk (checkpoint.dirpath)."
    )


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (its size on disk, less a little metadata)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _human(size: float) -> str:
    """``1536`` -> ``1.5 KB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
