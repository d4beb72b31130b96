"""Packaging: runtime dependencies agree, torch is never pinned for users, Registry metadata."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements(name):
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


def test_runtime_dependencies_match_and_exclude_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == sorted(_requirements("requirements.txt"))
    for req in project["dependencies"] + _requirements("requirements-train.txt"):
        assert not req.lower().startswith(("torch", "torchvision", "torchaudio")), req
    assert sorted(project["optional-dependencies"]["train"]) == sorted(_requirements("requirements-train.txt"))


def test_comfy_registry_metadata():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "WithAnyone" and comfy["Icon"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (ROOT / project["license"]["file"]).read_text().lstrip().startswith("Apache License")
    assert (ROOT / comfy["Icon"].split("/main/", 1)[1]).is_file()  # the icon the Registry shows is in the repo


def test_dev_setup_pins_torch_for_tests_only():
    dev = _requirements("requirements-dev.txt")
    assert "torch==2.14.1" in dev and "torchvision==0.29.1" in dev
