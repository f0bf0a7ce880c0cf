"""Where the SAM backbone comes from: a local file, the model folder, or a download that may fail."""

import logging

import pytest

from lib.configs import sam3d as config


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
     ({"compile": "maybe"}, "compile")],
)
def test_a_wrong_conf_fails_at_start_with_its_name(tmp_path, conf, message):
    with pytest.raises(ValueError, match=message):
        config.Sam3DTaskConfig().init("sam3d", str(tmp_path), {"sam_checkpoint": "none", **conf}, None)
