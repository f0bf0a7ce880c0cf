"""What a real server says about its weights: /info/ (what Slicer and OHIF show), each result, the start-up log."""

import pytest
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server


def info_and_click(url, tmp_path):
    """(/info/'s sam3d model, the JSON result of the README's click on demo_ct_01)."""
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    _, result = client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]], "background": []})
    return client.info()["models"]["sam3d"], result


def test_the_demo_weights_say_so_everywhere(demo_server, tmp_path):
    url, _, log_path = demo_server
    model, result = info_and_click(url, tmp_path)
    assert model["weights"]["state"] == "demo" and model["weights"]["backbone"] == "tiny"
    assert model["description"].startswith("DEMO WEIGHTS") and "--conf checkpoint" in model["description"]
    assert "DEMO WEIGHTS" in result["warning"]
    log = open(log_path).read()
    assert "demo weights are being made" in log and "WARNING" in log and "DEMO WEIGHTS" in log


@pytest.fixture(scope="module")
def untrained_server(tmp_path_factory, demo_studies):
    folder = tmp_path_factory.mktemp("untrained")
    log_path = str(folder / "server.log")
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]
    proc, url = start_server(copy_app(str(folder)), demo_studies, conf, log_path)
    yield url, log_path
    stop_server(proc)


def test_untrained_weights_say_that_masks_mean_nothing(untrained_server, tmp_path):
    url, log_path = untrained_server
    model, result = info_and_click(url, tmp_path)
    assert model["weights"]["state"] == "untrained"
    assert model["description"].startswith("UNTRAINED") and "POST /train/sam3d" in model["description"]
    assert "UNTRAINED" in result["warning"] and "backbone is random" in result["warning"]
    log = open(log_path).read()
    assert "WARNING" in log and "UNTRAINED: no trained weights are loaded" in log
