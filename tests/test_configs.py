"""The settings read from --conf, and where the weights come from: the backbone, the SAM file, the demo."""

import os
import logging

import pytest

from lib.configs import sam3d as config
from lib.model import CONFIGS, create_model, save_sam3d
from lib.settings import DEMO, Settings


def test_a_local_path_and_none_are_taken_as_given(tmp_path):
    assert config.sam_checkpoint_path("/data/sam_vit_b_01ec64.pth", "vit_b", str(tmp_path)) == "/data/sam_vit_b_01ec64.pth"
    assert config.sam_checkpoint_path("none", "vit_b", str(tmp_path)) is None
    assert config.sam_checkpoint_path("download", "tiny", str(tmp_path)) is None  # no SAM exists for it


def test_a_file_already_in_the_model_folder_is_used_without_downloading(tmp_path, monkeypatch):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    monkeypatch.setitem(config.SAM_URLS, "vit_b", "http://127.0.0.1:9/segment_anything/sam_vit_b_01ec64.pth")
    assert config.sam_checkpoint_path("download", "vit_b", str(tmp_path)) == str(tmp_path / "sam_vit_b_01ec64.pth")


def test_a_failed_download_logs_how_to_supply_the_file_and_carries_on(tmp_path, monkeypatch, caplog):
    # Port 9 on loopback refuses at once: the same path as an offline machine, without leaving this one.
    monkeypatch.setitem(config.SAM_URLS, "vit_b", "http://127.0.0.1:9/segment_anything/sam_vit_b_01ec64.pth")
    with caplog.at_level(logging.WARNING, logger=config.__name__):
        assert config.sam_checkpoint_path("download", "vit_b", str(tmp_path)) is None
    assert "Could not download the SAM vit_b checkpoint" in caplog.text
    assert "--conf sam_checkpoint" in caplog.text
    assert not list(tmp_path.iterdir())  # no partial file left behind


@pytest.mark.parametrize(
    "conf, message",
    [({"preset": "brain"}, "preset"), ({"backbone": "vit_x"}, "backbone"), ({"precision": "fp8"}, "precision"),
     ({"compile": "maybe"}, "compile"), ({"cache_mb": "lots"}, "cache_mb"), ({"cache_mb": "nan"}, "cache_mb"),
     ({"volume_cache_mb": "-5"}, "volume_cache_mb"), ({"volume_cache_mb": "inf"}, "volume_cache_mb"),
     ({"warmup": "perhaps"}, "warmup"), ({"max_upload_mb": "0"}, "max_upload_mb"),
     ({"dicomweb_timeout": "soon"}, "dicomweb_timeout"), ({"device": "tpu"}, "device"), ({"labels": " , "}, "labels"),
     ({"chekpoint": "x.pt"}, "chekpoint: unknown option"), ({"backbone": "vit_b", "checkpoint": "demo"}, "tiny")],
)
def test_a_wrong_conf_fails_at_start_with_its_name(tmp_path, conf, message):
    with pytest.raises(ValueError, match=message):
        config.Sam3DTaskConfig().init("sam3d", str(tmp_path), {"sam_checkpoint": "none", **conf}, None)


def test_settings_parse_each_option_once_with_its_type():
    settings = Settings.from_conf(
        {"cache_mb": "1.5", "volume_cache_mb": "0", "warmup": "No", "max_upload_mb": "10", "dicomweb_timeout": "2.5",
         "labels": "tumor, cyst", "compile": "FALSE", "checkpoint": "none"},
        cuda_available=False,
    )
    assert settings.cache_bytes == int(1.5 * 2**20) and settings.volume_cache_bytes == 0
    assert settings.warmup is False and settings.compile == "false" and settings.labels == ("tumor", "cyst")
    assert settings.max_upload_bytes == 10 * 2**20 and settings.dicomweb_timeout == 2.5
    assert settings.checkpoint is None and settings.device == "cpu"


def test_without_a_checkpoint_or_backbone_the_demo_is_served_and_a_backbone_alone_trains_from_scratch():
    assert Settings.from_conf({}, cuda_available=False).checkpoint == DEMO
    assert Settings.from_conf({"backbone": "tiny"}, cuda_available=False).checkpoint is None
    assert Settings.from_conf({"backbone": "vit_b"}, cuda_available=False).checkpoint is None
    assert Settings.from_conf({"checkpoint": "/data/kits.pth.tar"}, cuda_available=False).checkpoint == "/data/kits.pth.tar"


def test_the_backbone_and_its_sam_file_come_from_the_checkpoint(tmp_path):
    """A vit_l checkpoint served without --conf backbone gets SAM's vit_l file (the SAM file used to be chosen
    from the default vit_b before the checkpoint was read)."""
    tiny = create_model(CONFIGS["tiny"])
    checkpoint = tmp_path / "vit_l_adapters.pt"
    save_sam3d(tiny, str(checkpoint), "vit_l", list(tiny.state_dict())[:1])  # only the backbone name is read
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "sam_vit_l_0b3195.pth").write_bytes(b"stands in for SAM's file")
    settings = Settings.from_conf({"checkpoint": str(checkpoint)}, cuda_available=False)
    source = config.model_source(settings, str(tmp_path / "model"))
    assert source.backbone == "vit_l"
    assert source.sam_checkpoint == str(tmp_path / "model" / "sam_vit_l_0b3195.pth")


def test_a_published_model_serves_only_over_the_checkpoint_it_was_trained_from(tmp_path):
    tiny = create_model(CONFIGS["tiny"])
    everything = list(tiny.state_dict())
    save_sam3d(tiny, str(tmp_path / "base.pt"), "tiny", everything)
    save_sam3d(tiny, str(tmp_path / "sam3d.pt"), "tiny", everything, meta={"base": str(tmp_path / "base.pt")})
    published = str(tmp_path / "sam3d.pt")
    assert config.served_file(published, str(tmp_path / "base.pt")) == published
    assert config.served_file(published, "/data/kits.pth.tar") == "/data/kits.pth.tar"


def test_a_sam_download_is_renamed_into_place_only_when_whole_and_right(tmp_path, monkeypatch):
    """The file arrives through a real HTTP server on loopback; a damaged one (wrong MD5) never becomes the model."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "sam_vit_b_01ec64.pth").write_bytes(b"not SAM's weights")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/sam_vit_b_01ec64.pth"
        monkeypatch.setitem(config.SAM_URLS, "vit_b", url)
        model_dir = tmp_path / "model"
        assert config.sam_checkpoint_path("download", "vit_b", str(model_dir)) is None  # MD5 01ec64... expected
        assert not list(model_dir.iterdir())  # neither the damaged file nor a partial one

        content = next(b"%d" % i for i in range(10**6) if config.hashlib.md5(b"%d" % i).hexdigest().startswith("01e"))
        monkeypatch.setitem(config.SAM_URLS, "vit_b", url.replace("01ec64", "01e"))
        (served / "sam_vit_b_01e.pth").write_bytes(content)
        path = config.sam_checkpoint_path("download", "vit_b", str(model_dir))
        assert path == str(model_dir / "sam_vit_b_01e.pth") and open(path, "rb").read() == content
        assert [p.name for p in model_dir.iterdir()] == ["sam_vit_b_01e.pth"]
    finally:
        httpd.shutdown()


def test_the_readmes_configuration_table_lists_every_option_with_its_default():
    """One row per --conf option of lib/settings.py's OPTIONS, in the README's table, with the same default."""
    import re

    from conftest import ROOT
    from lib.settings import OPTIONS

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Configuration"):text.index("Booleans accept")]
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", table, re.M)}
    assert set(rows) == set(OPTIONS), set(rows) ^ set(OPTIONS)
    for name, option in OPTIONS.items():
        default = option.default
        if default == "":
            assert rows[name] == "none", name
        elif default is not None:
            assert rows[name] == f"`{default}`", (name, rows[name], default)


def test_the_readmes_training_table_lists_every_training_option_with_its_default():
    """One row per training option of lib/trainers/sam3d_trainer.py's TRAINING_OPTIONS, in the README's table."""
    import re

    from conftest import ROOT
    from lib.trainers.sam3d_trainer import TRAINING_OPTIONS

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("| training option |"):text.index("Any other key but MONAI Label's")]
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \| ([^|]*) \|", table, re.M)}
    assert set(rows) == set(TRAINING_OPTIONS), set(rows) ^ set(TRAINING_OPTIONS)
    for name, option in TRAINING_OPTIONS.items():
        assert rows[name] == (f"`{option.default}`", option.accepts), (name, rows[name])


def test_activation_checkpointing_is_on_for_the_papers_sizes_and_off_for_tiny_unless_asked():
    """The default trades a third more compute for memory where memory bounds a step (a vit_b step on a CPU does not
    fit in 24 GB without it) and not for the tiny configuration, whose step it makes 1.4-1.5 times as long."""
    from lib.errors import InvalidRequest
    from lib.trainers.sam3d_trainer import training_options
    from lib.training.job import configured

    def checkpointing(request, backbone):
        return configured(training_options(request), backbone)["activation_checkpointing"]

    assert [checkpointing({}, backbone) for backbone in ("tiny", "vit_b", "vit_l", "vit_h")] == [False, True, True, True]
    assert training_options({"activation_checkpointing": "AUTO"})["activation_checkpointing"] is None
    for asked in (True, "true", "on"):
        on = {"activation_checkpointing": asked}
        assert (checkpointing(on, "tiny"), checkpointing(on, "vit_b")) == (True, True)
    off = {"activation_checkpointing": False}
    assert (checkpointing(off, "tiny"), checkpointing(off, "vit_b")) == (False, False)
    with pytest.raises(InvalidRequest, match="activation_checkpointing"):
        training_options({"activation_checkpointing": "sometimes"})


def test_learning_rate_is_the_papers_for_its_sizes_and_tinys_own_unless_asked():
    """The tiny configuration trains all its weights (no SAM under it) and learned real tumours better at 1e-3 over a
    30-minute run (docs/real_scans.md); the paper's sizes keep the authors' 4e-4."""
    from lib.errors import InvalidRequest
    from lib.trainers.sam3d_trainer import training_options
    from lib.training.job import configured

    def learning_rate(request, backbone):
        return configured(training_options(request), backbone)["learning_rate"]

    assert [learning_rate({}, backbone) for backbone in ("tiny", "vit_b", "vit_l", "vit_h")] == [1e-3, 4e-4, 4e-4, 4e-4]
    assert learning_rate({"learning_rate": "Auto"}, "vit_b") == 4e-4
    assert (learning_rate({"learning_rate": "2e-4"}, "tiny"), learning_rate({"learning_rate": 5e-5}, "vit_b")) == (2e-4, 5e-5)
    for bad in ("fast", "0", "-1e-3", "nan", True):
        with pytest.raises(InvalidRequest, match="learning_rate: .*, nor auto"):
            training_options({"learning_rate": bad})
