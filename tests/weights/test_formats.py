"""Weights files never run foreign code; downloads are cached per URL, checksummed and written atomically.

No network: URLs are ``file://`` addresses of files written in ``tmp_path``; torch's cache is a tmp folder.
"""

import argparse
import hashlib
import os
import pickle
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torchvision

from deeplab_lit.inference import InferenceConfig
from deeplab_lit.normalization import CAFFE_BGR
from deeplab_lit.weights.download import cache_path, download
from deeplab_lit.weights.formats import UnsafeCheckpointError, read_checkpoint
from tests.weights import imagenet_backbone


class RunsShellCommand:
    """Unpickling this object runs ``touch <marker>``: what a crafted weights file can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's cache in tmp_path (``torch.hub.set_dir``; the previous directory is restored after)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def downloads(monkeypatch):
    """Record the URLs fetched (the real download function still does the fetching)."""
    calls, real = [], torch.hub.download_url_to_file

    def counting(url, dst, *args, **kwargs):
        calls.append(url)
        return real(url, dst, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", counting)
    return calls


def small_state(seed=0):
    """A tiny state dict in this project's key layout (enough for read_checkpoint to recognise it)."""
    generator = torch.Generator().manual_seed(seed)
    return {"backbone.conv1.weight": torch.randn(4, 3, 3, 3, generator=generator),
            "head.weight": torch.randn(3, 4, 1, 1, generator=generator)}  # fmt: skip


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------- never unpickle
def crafted_files(tmp_path, marker):
    """A torch.save file and a raw pickle, each holding an object whose unpickling creates ``marker``."""
    torch.save({"state_dict": small_state(), "evil": RunsShellCommand(marker)}, tmp_path / "zip.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"evil": RunsShellCommand(marker)}))
    return [tmp_path / "zip.pth", tmp_path / "raw.pth"]


def test_crafted_pickle_is_refused_without_running_its_code(tmp_path, hub):
    marker = tmp_path / "marker"
    assert pickle.loads(pickle.dumps(RunsShellCommand(marker))) == 0 and marker.exists()  # it does run
    marker.unlink()
    zip_file, raw_file = crafted_files(tmp_path, marker)
    for source in (zip_file, zip_file.as_uri()):  # a local file, and a file:// URL (downloaded first)
        with pytest.raises(UnsafeCheckpointError) as info:
            read_checkpoint(source)
        message = str(info.value)
        assert "zip.pth" in message and "system" in message  # the file and the object it holds
        assert "arbitrary code" in message and "weights_only=False" in message and "converted.pth" in message
    for source in (raw_file, raw_file.as_uri()):  # a pickle protocol torch's safe loader does not read
        with pytest.raises(ValueError, match=r"raw\.pth.*without full unpickling.*arbitrary code"):
            read_checkpoint(source)
    with pytest.raises(ValueError, match=r"zip\.pth.*arbitrary code"):  # ImageNet weights: same reader
        imagenet_backbone("resnet18", source=str(zip_file))
    assert not marker.exists()


def test_refused_file_converts_with_the_command_the_message_gives(tmp_path):
    """An old checkpoint whose hyper-parameters are an argparse.Namespace: refused, then converted."""
    state = small_state(seed=1)
    hparams = argparse.Namespace(num_classes=3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hparams": hparams},
               tmp_path / "old.ckpt")  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match=r"old\.ckpt.*argparse\.Namespace") as info:
        read_checkpoint(tmp_path / "old.ckpt")
    code = re.search(r'python -c "(.+?)" and pass', str(info.value)).group(1)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    converted = read_checkpoint(tmp_path / "converted.pth")
    assert converted.state.keys() == state.keys() and torch.equal(
        converted.state["head.weight"], state["head.weight"]
    )


@pytest.fixture
def no_registered_safe_globals():
    """Forget what other modules declared safe (modules/base.py does): only the reader's own list counts."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.add_safe_globals(saved)


def test_this_projects_config_objects_are_read_without_outside_registration(
    tmp_path, no_registered_safe_globals
):
    """``Trainer.fit`` (not the CLI) saves the module's InferenceConfig and the data's Normalization."""
    hparams = {"_class_path": "deeplab_lit.DeepLabV1", "backbone": "resnet18", "inference": InferenceConfig()}
    state = {f"model.{k}": v for k, v in small_state().items()}
    checkpoint = {"state_dict": state, "hyper_parameters": hparams,
                  "datamodule_hyper_parameters": {"normalization": CAFFE_BGR}}  # fmt: skip
    torch.save(checkpoint, tmp_path / "api.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "api.ckpt", weights_only=True)  # torch alone refuses them
    read = read_checkpoint(tmp_path / "api.ckpt")
    assert read.version == "v1" and read.normalization == CAFFE_BGR


def test_reading_keeps_what_others_declared_safe(tmp_path, no_registered_safe_globals):
    """modules/base.py declares InferenceConfig safe for Lightning's own loads; reading must not undo it."""
    torch.serialization.add_safe_globals([InferenceConfig])
    hparams = {"_class_path": "deeplab_lit.DeepLabV1", "inference": InferenceConfig()}
    torch.save({"state_dict": small_state(), "hyper_parameters": hparams}, tmp_path / "api.ckpt")
    read_checkpoint(tmp_path / "api.ckpt")
    assert InferenceConfig in torch.serialization.get_safe_globals()
    torch.load(tmp_path / "api.ckpt", weights_only=True)  # as Lightning loads a checkpoint to resume


def test_cached_imagenet_weights_replaced_by_a_crafted_pickle_are_refused(tmp_path, hub):
    """torch does not re-check the hash of a cached file: it must still be read safely."""
    marker = tmp_path / "marker"
    hub.mkdir(parents=True)
    torch.save({"evil": RunsShellCommand(marker)}, hub / "resnet18-f37072fd.pth")  # torchvision's file name
    with pytest.raises(UnsafeCheckpointError, match=r"resnet18-f37072fd\.pth.*arbitrary code"):
        imagenet_backbone("resnet18", source=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ cache
def test_two_urls_with_the_same_file_name_are_cached_apart(tmp_path, hub):
    for seed, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        torch.save(small_state(seed), tmp_path / folder / "model.pth")
    first, second = (read_checkpoint((tmp_path / f / "model.pth").as_uri()) for f in ("a", "b"))
    assert first.source != second.source
    assert not torch.equal(first.state["head.weight"], second.state["head.weight"])
    assert torch.equal(second.state["head.weight"], small_state(1)["head.weight"])
    assert len(list(hub.glob("model.*.pth"))) == 2


def hashed_copy(tmp_path, digest_prefix_length=None):
    """A weights file named as torchvision names its files, ``<name>-<sha256 prefix>.pth``."""
    torch.save(small_state(), tmp_path / "plain.pth")
    digest = sha256(tmp_path / "plain.pth")
    length = digest_prefix_length or next(n for n in range(8, 65) if re.search("[a-f]", digest[:n]))
    path = tmp_path / f"weights-{digest[:length]}.pth"
    (tmp_path / "plain.pth").rename(path)
    return path


def test_checksum_in_the_file_name_is_verified(tmp_path, hub):
    good = hashed_copy(tmp_path)
    assert torch.equal(read_checkpoint(good.as_uri()).state["head.weight"], small_state()["head.weight"])
    bad = tmp_path / "weights-deadbeef.pth"
    torch.save(small_state(seed=1), bad)
    with pytest.raises(ValueError, match=r"weights-deadbeef\.pth fail their checksum.*expected deadbeef"):
        read_checkpoint(bad.as_uri())
    assert not cache_path(bad.as_uri()).exists() and not list(hub.glob("*.partial"))  # nothing cached
    plain = tmp_path / "plain.pth"
    plain.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="fail their checksum"):  # an explicit sha256, URL or local file
        read_checkpoint(plain.as_uri(), sha256="0" * 64)
    assert read_checkpoint(plain.as_uri(), sha256=sha256(good)[:16]).format == "deeplab_lit"
    with pytest.raises(ValueError, match=r"weights-.*fails its checksum"):
        read_checkpoint(good, sha256="0" * 64)
    assert read_checkpoint(good, sha256=sha256(good)).format == "deeplab_lit"


def test_damaged_cached_file_is_fetched_again_once(tmp_path, hub, downloads):
    url = hashed_copy(tmp_path).as_uri()
    read_checkpoint(url)
    cached = cache_path(url)
    cached.write_bytes(cached.read_bytes()[:-100])  # e.g. a copy cut short
    with pytest.warns(UserWarning, match="damaged.*downloading it again"):
        checkpoint = read_checkpoint(url)
    assert torch.equal(checkpoint.state["head.weight"], small_state()["head.weight"])
    assert downloads == [url, url]


def test_unreadable_cached_file_without_checksum_is_fetched_again_once(tmp_path, hub, downloads):
    source = tmp_path / "model.pth"
    torch.save(small_state(), source)
    read_checkpoint(source.as_uri())
    cache_path(source.as_uri()).write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="could not be read; downloading it again"):
        read_checkpoint(source.as_uri())
    assert len(downloads) == 2
    source.write_bytes(b"\x00" * 100)  # the source itself is bad: one more fetch, then a clear error
    cache_path(source.as_uri()).write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"model\.pth.*could not be read"):
        read_checkpoint(source.as_uri())
    assert len(downloads) == 3


def test_interrupted_download_leaves_no_cached_file(tmp_path, hub, monkeypatch):
    source = tmp_path / "model.pth"
    torch.save(small_state(), source)
    real = torch.hub.download_url_to_file

    def cut_off(url, dst, *args, **kwargs):
        with open(dst, "wb") as file:
            file.write(source.read_bytes()[:-100])
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(torch.hub, "download_url_to_file", cut_off)
    with pytest.raises(RuntimeError, match=r"Could not download.*connection reset.*copy it to .*model\."):
        download(source.as_uri())
    assert not cache_path(source.as_uri()).exists() and not list(hub.iterdir())
    monkeypatch.setattr(torch.hub, "download_url_to_file", real)
    assert download(source.as_uri()).read_bytes() == source.read_bytes()


def test_numbers_in_file_names_are_not_taken_for_checksums(tmp_path, hub):
    """kazuto1011's ``...-vocaug-20000.pth`` and dates hold digits only: no checksum to verify."""
    for name in ("deeplabv2_resnet101_msc-vocaug-20000.pth", "model-20240101.pth"):
        torch.save(small_state(), tmp_path / name)
        assert read_checkpoint((tmp_path / name).as_uri()).format == "deeplab_lit"


def test_torchvision_resnet_weights_file_names_carry_checksums():
    """The convention checked above is the one torchvision's URLs follow."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert re.search(r"-[0-9a-f]{8}\.pth$", url)


def test_damaged_cached_file_that_cannot_be_fetched_again_is_said_to_be_damaged(tmp_path, hub, downloads):
    source = hashed_copy(tmp_path)
    url = source.as_uri()
    read_checkpoint(url)
    cached = cache_path(url)
    cached.write_bytes(cached.read_bytes()[:-100])
    source.unlink()  # the download fails now, as offline
    expected = re.search(r"-([0-9a-f]+)\.pth", source.name).group(1)
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(RuntimeError) as caught:
        read_checkpoint(url)
    message = str(caught.value)
    assert f"the copy of {cached.name} there is damaged (its SHA-256 is " in message
    assert f"expected {expected})" in message and "is not there" not in message
    assert f"Could not download the weights {url}: " in message  # and why
    assert f"copy it to {cached}, replacing the damaged one, or pass its local path" in message
    assert len(downloads) == 2
