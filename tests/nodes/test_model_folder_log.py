"""A pickled adapter file in models/withanyone/ is named at start-up with the conversion advice.

The adapter loader lists only .safetensors (pickles can run code when loaded), so without this log line a
user's withanyone.pt or .bin would simply be missing from the list.
"""

import logging
import shlex
import subprocess
import sys

import torch

from support.comfy_env import import_comfyui, import_pack


def test_pickled_adapter_files_are_named_in_the_start_up_log(tmp_path, caplog):
    models = tmp_path / "models"
    (models / "withanyone" / "old").mkdir(parents=True)
    torch.save({"ipa_arc.0.norm1.weight": torch.ones(4)}, models / "withanyone" / "withanyone.pt")
    (models / "withanyone" / "old" / "adapter.bin").write_bytes(b"\x80\x02}q\x00.")
    (models / "withanyone" / "withanyone.safetensors").write_bytes(b"")
    folder_paths = import_comfyui(models)
    import_pack()
    from withanyone_pack.nodes import loaders

    with caplog.at_level(logging.WARNING, logger=loaders.logger.name):
        loaders.register_model_folders()
    lines = [r.getMessage() for r in caplog.records if r.name == loaders.logger.name]
    named = sorted(line.split(" is not listed")[0].removeprefix("WithAnyone: ") for line in lines)
    assert named == sorted(
        [str(models / "withanyone" / "old" / "adapter.bin"), str(models / "withanyone" / "withanyone.pt")]
    )
    assert "withanyone.safetensors" in folder_paths.get_filename_list("withanyone")
    assert "withanyone.pt" not in folder_paths.get_filename_list("withanyone")

    # the advice is a command that works: it writes the .safetensors next to the .pt
    advice = next(line for line in lines if line.endswith("withanyone.safetensors')\""))
    command = advice.split("python -c ", 1)[1]
    (models / "withanyone" / "withanyone.safetensors").unlink()
    subprocess.run([sys.executable, "-c", *shlex.split(command)], check=True, cwd=tmp_path)
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(models / "withanyone" / "withanyone.safetensors")["ipa_arc.0.norm1.weight"], torch.ones(4)
    )
