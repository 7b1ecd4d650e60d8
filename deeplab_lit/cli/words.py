"""Rewriting the words a user types into LightningCLI's own options, before it parses them.

``predict --weights NAME photos/ [--output DIR]`` becomes the registry entry's model and data options
(:func:`with_named_weights`); a subcommand with ``--ckpt_path`` and no config gets the checkpoint's model
and data classes (:func:`with_checkpoint_classes`). The user's own options follow the inserted ones, so
they still override.
"""

from __future__ import annotations

import json

from deeplab_lit.cli.restore import (
    CKPT_PATH_WORDS,
    check_trusted,
    check_trusted_options,
    plain,
    read_training_checkpoint,
    reconcile_model,
)
from deeplab_lit.weights import registry


def _split_words(words: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split ``words`` into ``(--option, value)`` pairs (value None for a bare flag) and positionals."""
    options: list[tuple[str, str | None]] = []
    positionals: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("--") and "=" in word:
            name, value = word.split("=", 1)
            options.append((name, value))
        elif word.startswith("-"):
            has_value = index + 1 < len(words) and not words[index + 1].startswith("--")
            options.append((word, words[index + 1] if has_value else None))
            index += has_value
        else:
            positionals.append(word)
        index += 1
    return options, positionals


def _option_value(words: list[str], name: str) -> str | None:
    """Return the value of ``--name X`` or ``--name=X`` in ``words`` (the last one), None if absent."""
    return dict(_split_words(words)[0]).get(f"--{name}")


def _gives(words: list[str], group: str) -> bool:
    return any(w == f"--{group}" or w.startswith((f"--{group}=", f"--{group}.class_path")) for w in words)


def with_checkpoint_classes(words: list[str]) -> list[str]:
    """Insert the checkpoint's model and data classes when a subcommand has ``--ckpt_path`` and no config.

    Only when neither ``--config`` nor the group itself (``--model``/``--data``) is given; the user's
    words follow the inserted ones, so they still override. Without a config the checkpoint is read here,
    so that a missing, unreadable or foreign file is reported as such (not as "model is required"); a
    class it names outside ``deeplab_lit`` is refused (:func:`~deeplab_lit.cli.restore.check_trusted`).
    """
    subcommand = next((i for i, w in enumerate(words) if not w.startswith("-")), None)
    if subcommand is None:
        return words
    rest = words[subcommand + 1 :]
    ckpt_path = _option_value(rest, "ckpt_path")
    if not ckpt_path or ckpt_path in CKPT_PATH_WORDS or _option_value(rest, "config") or "-c" in rest:
        return words
    saved = read_training_checkpoint(ckpt_path)
    inserted = []
    if not _gives(rest, "model"):
        if saved.model_class is None:
            reconcile_model(saved, None, {})  # raises: the checkpoint does not say which class; name it
        check_trusted(saved, saved.model_class, "model", f"--model {saved.model_class}")
        inserted.append(f"--model={saved.model_class}")
    if not _gives(rest, "data") and saved.data_class:
        check_trusted(saved, saved.data_class, "datamodule", f"--data {saved.data_class} (or a --config)")
        check_trusted_options(saved, saved.data_hparams, "data")
        data = {"class_path": saved.data_class, "init_args": plain(saved.data_hparams)}
        inserted.append(f"--data={json.dumps(data)}")
    return [*words[: subcommand + 1], *inserted, *rest]


def with_named_weights(words: list[str]) -> list[str] | None:
    """Rewrite ``predict --weights NAME PATH [--output DIR]`` into the LightningCLI's own options.

    The model class, its architecture, class names and normalisation come from the registry entry
    (:mod:`deeplab_lit.weights.registry`); the images from ``PATH`` (a file, folder or glob); the masks go
    to ``--output`` (default ``predictions``), with the run's ``config.yaml``; no logger. Other options
    are passed on after these, so they override. ``--list-weights`` prints the registered names and
    returns None. Words without ``--weights`` are returned unchanged.
    """
    options, positionals = _split_words(words[1:])
    names = [name for name, _ in options]
    if "--list-weights" in names:
        print(registry.describe_weights())
        return None
    if "--weights" not in names:
        return words
    given = dict(options)
    name = given["--weights"]
    if not name:
        raise SystemExit(f"predict --weights needs a name, one of: {', '.join(registry.list_weights())}")
    if len(positionals) != 1:
        raise SystemExit(
            f"predict --weights {name} needs exactly one image file, folder or glob after the options "
            f"(e.g. photos/), got {positionals or 'none'}"
        )
    if "--ckpt_path" in given or "--config" in given or "-c" in given:
        raise SystemExit("predict --weights takes the model from the registry: drop --ckpt_path/--config")
    try:
        entry = registry.get_weights(name)
    except registry.UnknownWeightsError as err:
        raise SystemExit(str(err)) from None
    if entry.data_class is None:
        raise SystemExit(
            f"{name} predicts {entry.num_classes} classes that no data module names ({entry.data}): it is "
            f"published to start training from; fine-tune it with model.init_args.weights: {name}"
        )
    model = {"class_path": entry.module_class, "init_args": entry.module_options()}
    # root: the data set's folder, which the data modules require and predict never reads
    normalization = entry.normalization.to_dict()
    data_options = {"root": ".", "predict_path": positionals[0], "normalization": normalization}
    data = {"class_path": entry.data_class, "init_args": data_options}
    rest = [word for option, value in options if option not in ("--weights", "--output")
            for word in ((option,) if value is None else (f"{option}={value}",))]  # fmt: skip
    output = given.get("--output") or "predictions"
    return [
        "predict",
        f"--model={json.dumps(model)}",
        f"--data={json.dumps(data)}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={output}",  # the run's config.yaml goes beside the masks
        f"--prediction.output_dir={output}",
        *rest,
    ]
