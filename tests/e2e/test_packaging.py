"""Packaging: runtime dependencies agree, torch is never pinned for users, Comfy Registry metadata.

The Registry checks follow its documented pyproject fields (docs.comfy.org/registry/specifications) and the
rules comfy-cli's parser (comfy_cli/registry/config_parser.py, the code `comfy node publish` runs) applies:
OS and accelerator classifiers from fixed lists, version specifiers like ">=0.3.75".
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from support.needs import missing, pip_install_into

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]

TESTED_COMFYUI = (0, 3, 75)
# Registry ids other WithAnyone ports already use (compared case-insensitively by the Registry)
TAKEN_NAMES = {"comfyui-withanyone", "withanyone"}
# comfy-cli's validate_and_extract_os_classifiers / validate_and_extract_accelerator_classifiers
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {
    "GPU :: NVIDIA CUDA",
    "GPU :: AMD ROCm",
    "GPU :: Intel Arc",
    "NPU :: Huawei Ascend",
    "GPU :: Apple Metal",
}
# comfy-cli's validate_version, applied to each comma-separated part of requires-comfyui
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def _requirements(name):
    lines = (ROOT / name).read_text().splitlines()
    # pip's rule: " #" starts an inline comment
    lines = [re.sub(r"(^|\s+)#.*$", "", line).strip() for line in lines]
    return [line for line in lines if line and not line.startswith("-r")]


def test_runtime_dependencies_match_and_exclude_torch():
    assert sorted(PROJECT["dependencies"]) == sorted(_requirements("requirements.txt"))
    for req in PROJECT["dependencies"] + _requirements("requirements-train.txt"):
        assert not req.lower().startswith(("torch", "torchvision", "torchaudio")), req
    assert sorted(PROJECT["optional-dependencies"]["train"]) == sorted(_requirements("requirements-train.txt"))


def test_registry_name_is_valid_unique_and_without_comfyui():
    name = PROJECT["name"]
    # documented: < 100 characters; letters, digits, - _ .; no two special characters in a row; starts with a letter
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower(), "the Registry advises against 'ComfyUI' in names"
    assert name.lower() not in TAKEN_NAMES
    assert "comfyui" not in COMFY["DisplayName"].lower() and COMFY["DisplayName"].startswith("WithAnyone")
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"])


def test_registry_version_license_and_description():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "X.Y.Z (semantic versioning)"
    assert (ROOT / PROJECT["license"]["file"]).read_text().lstrip().startswith("Apache License")
    assert "Apache" in " ".join(PROJECT["classifiers"])
    assert 40 < len(PROJECT["description"]) < 400 and "\n" not in PROJECT["description"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {PROJECT['version']}" in changelog, "CHANGELOG.md has a section for the version in pyproject.toml"


def test_registry_classifiers_and_comfyui_version():
    classifiers = PROJECT["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems), systems
    assert accelerators and set(accelerators) <= ACCELERATORS, accelerators
    requires = COMFY["requires-comfyui"]
    assert all(VERSION_PART.match(part.strip()) for part in requires.split(",")), requires
    # the ComfyUI the tests run (tools/common/get_comfyui.py) is one the pack claims to support
    low = re.match(r">=\s*(\d+)\.(\d+)\.(\d+)", requires)
    assert low and tuple(map(int, low.groups())) <= TESTED_COMFYUI, requires


def test_registry_urls_and_icon_in_this_repository():
    from PIL import Image

    urls = PROJECT["urls"]
    repository = urls["Repository"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", repository)
    assert match, repository
    owner, repo = match.groups()
    for key in ("Documentation", "Bug Tracker", "Issues"):
        assert urls[key].startswith(repository), (key, urls[key])
    assert urls["Bug Tracker"] == urls["Issues"] == repository + "/issues"
    # the icon is a file of this repository, addressed as its raw file on the default branch
    icon = re.fullmatch(rf"https://raw\.githubusercontent\.com/{owner}/{repo}/main/(.+)", COMFY["Icon"])
    assert icon, COMFY["Icon"]
    path = ROOT / icon.group(1)
    assert path.is_file() and path.suffix == ".png"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", icon.group(1)], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0, f"{icon.group(1)} is not committed"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == image.height <= 400, image.size  # square, at most 400 px


def test_publish_workflow_uses_the_comfy_org_action_on_version_bumps():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True]  # YAML reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"] and triggers["push"]["paths"] == ["pyproject.toml"]
    publish = workflow["jobs"]["publish-node"]
    assert publish["needs"] == "version-bumped" and "changed == 'true'" in publish["if"]
    action = next(step for step in publish["steps"] if "publish-node-action" in step.get("uses", ""))
    assert action["uses"].startswith("Comfy-Org/publish-node-action@")
    assert action["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None, reason="needs git and bash")
def test_publish_workflow_publishes_only_when_the_version_changes(tmp_path):
    """The workflow's own compare step, run on a scratch repository: a version bump publishes, an edit of
    another field does not, a manual run always does."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    script = next(s for s in workflow["jobs"]["version-bumped"]["steps"] if s.get("id") == "compare")["run"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]

    def commit(version: str, description: str) -> str:
        (tmp_path / "pyproject.toml").write_text(
            f'[project]\nname = "x"\nversion = "{version}"\ndescription = "{description}"\n'
        )
        subprocess.run([*git, "add", "pyproject.toml"], cwd=tmp_path, check=True, capture_output=True)
        subprocess.run([*git, "commit", "-qm", version], cwd=tmp_path, check=True, capture_output=True)
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout.strip()

    def changed(before: str, event: str = "push") -> str:
        output = tmp_path / "github_output"
        output.write_text("")
        env = {**os.environ, "BEFORE": before, "EVENT": event, "GITHUB_OUTPUT": str(output)}
        subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True)
        return output.read_text().strip()

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    first = commit("0.1.0", "a")
    second = commit("0.1.0", "b")
    assert changed(first) == "changed=false"
    third = commit("0.2.0", "b")
    assert changed(second) == "changed=true"
    assert changed(third, "workflow_dispatch") == "changed=true"
    assert changed("0000000000000000000000000000000000000000") == "changed=true"  # a new branch: no "before"


COMFY_CLI = "1.23.0"  # the version whose parser these checks were written against


def _comfy_cli() -> Path:
    """comfy-cli's package folder (with tomlkit and pathspec), installed on demand into .cache/ without its other
    dependencies: its registry parser and packer need only typer and rich besides, which the dev environment has."""
    target = ROOT / ".cache" / f"comfy-cli-{COMFY_CLI}"
    if not ((target / "comfy_cli" / "registry" / "config_parser.py").is_file() and (target / "pathspec").is_dir()):
        error = pip_install_into(target, f"comfy-cli=={COMFY_CLI}", "tomlkit", "pathspec", upgrade=True)
        if error:
            missing(f"comfy-cli=={COMFY_CLI} could not be installed: {error}")
    return target


def test_comfy_cli_reads_every_registry_field_without_warnings():
    """The parser `comfy node publish` runs (comfy_cli.registry.config_parser) reads pyproject.toml: no
    warning, and every field the Registry shows is filled."""
    # tomlkit's string and array types: plain Python values before they leave the parser's process
    code = (
        "import json; from comfy_cli.registry.config_parser import extract_node_configuration; "
        "plain = lambda o: {k: plain(v) for k, v in vars(o).items()} if hasattr(o, '__dataclass_fields__') "
        "else [plain(v) for v in o] if isinstance(o, list) else str(o); "
        "print(json.dumps(plain(extract_node_configuration('pyproject.toml'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(_comfy_cli())},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *messages, answer = done.stdout.strip().splitlines()
    assert not [m for m in messages if "warning" in m.lower()], messages
    config = json.loads(answer)
    project, comfy = config["project"], config["tool_comfy"]
    assert project["name"] == PROJECT["name"] and project["version"] == PROJECT["version"]
    assert all(project["urls"][key] for key in ("homepage", "documentation", "repository", "issues")), project["urls"]
    assert project["supported_os"] and project["supported_accelerators"]
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"]
    assert project["license"]["file"] == "LICENSE"
    assert comfy["publisher_id"] and comfy["display_name"] and comfy["icon"] == COMFY["Icon"]


def test_registry_package_holds_the_pack_and_leaves_out_the_tests(tmp_path):
    """The zip `comfy node publish` uploads, built by comfy-cli's own zip_files (git-tracked files minus
    .comfyignore): everything ComfyUI and the Manager need, no tests or CI files."""
    import zipfile

    archive = tmp_path / "node.zip"
    code = f"from comfy_cli.file_utils import zip_files; zip_files({str(archive)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(_comfy_cli())},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(zipfile.ZipFile(archive).namelist())
    needed = {
        "__init__.py",
        "pyproject.toml",
        "requirements.txt",
        "LICENSE",
        "README.md",
        "nodes/__init__.py",
        "nodes/routes.py",
        "withanyone_core/__init__.py",
        "web/withanyone.js",
        "web/icon.png",
        "web/docs/WithAnyoneLayout.md",
        "locales/en/nodeDefs.json",
        "locales/zh/nodeDefs.json",
        # what a user runs besides the nodes: the trainer, the benchmark runner and the workflows
        "train/run.py",
        "train/_script.py",
        "train/configs/comfyui.yaml",
        "tools/bench_run.py",
        "tools/common/workflows.py",
        "example_workflows/WithAnyone - one person.json",
    }
    assert needed <= names, f"missing from the Registry package: {sorted(needed - names)}"
    # developer generators, test fixtures and CI stay in the repository
    assert not [n for n in names if n.startswith(("tests/", "dev/", ".ci/", ".github/"))]


def test_library_and_trainer_are_packages_of_the_project(tmp_path):
    """`pip install -e ".[train]"` (make setup): `python -m train.run` works from any folder, and only the library
    and the trainer are installed (the pack's nodes, tools and tests never become top-level names)."""
    done = subprocess.run([sys.executable, "-m", "train.run", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout, done.stderr[-2000:]
    code = (
        "import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) is not None "
        "for n in ('withanyone_core', 'train', 'train.data.sources', 'nodes', 'tools', 'dev', 'tests')}))"
    )
    found = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    )
    assert found == {
        "withanyone_core": True,
        "train": True,
        "train.data.sources": True,
        "nodes": False,
        "tools": False,
        "dev": False,
        "tests": False,
    }
    # a script inside a ComfyUI install (the project not installed) runs as its package module
    for script in ("run", "merge", "prepare"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "train" / f"{script}.py"), "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr[-2000:])


def test_dev_setup_pins_torch_for_tests_only():
    dev = _requirements("requirements-dev.txt")
    assert "torch==2.14.1" in dev and "torchvision==0.29.1" in dev
