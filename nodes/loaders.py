"""Model folders and loader nodes: the WithAnyone adapter and the antelopev2 face analyzer."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

from .schema import advanced
from .types import ADAPTER, FACE_ANALYZER, SIGLIP, SiglipModel

logger = logging.getLogger(__name__)

CATEGORY = "WithAnyone/loaders"


def _register(name: str, extensions: set[str]) -> None:
    """Add ``models/<name>`` without dropping paths users configured in extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([default], extensions)


def register_model_folders() -> None:
    _register("withanyone", {".safetensors"})
    _register("insightface", set())
    _register("siglip", {".safetensors"})
    log_pickled_adapter_files()


PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def log_pickled_adapter_files() -> list[str]:
    """The adapter loader lists only .safetensors: name each pickled file in models/withanyone/ in the start-up
    log, with the conversion advice, instead of leaving it invisible. Returns the files found."""
    found = []
    for root in folder_paths.get_folder_paths("withanyone"):
        for folder, _, files in os.walk(root):
            found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(PICKLED_SUFFIXES)]
    for path in found:
        target = os.path.splitext(path)[0] + ".safetensors"
        logger.warning(
            "WithAnyone: %s is not listed in Load WithAnyone Adapter: pickled checkpoints can run code when loaded "
            'and are never read. Convert it once, in a trusted environment: python -c "import torch, '
            'safetensors.torch as st; st.save_file(torch.load(%r, weights_only=True), %r)"',
            path,
            path,
            target,
        )
    return found


IDENTITIES_SUBFOLDER = "identities"  # models/withanyone/identities/: saved people (nodes/identities.py), not adapters


def adapter_choices() -> list[str]:
    """The .safetensors files in models/withanyone/, without the saved identities in its identities/ subfolder."""
    return [
        n
        for n in folder_paths.get_filename_list("withanyone")
        if n.replace("\\", "/").split("/")[0] != IDENTITIES_SUBFOLDER
    ]


def siglip_choices() -> list[str]:
    """Single files and Hugging Face folders in models/siglip/, plus files in models/clip_vision/."""
    names = list(folder_paths.get_filename_list("siglip"))
    for root in folder_paths.get_folder_paths("siglip"):
        if os.path.isdir(root):
            names += sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json")))
    names += [f"clip_vision/{n}" for n in folder_paths.get_filename_list("clip_vision") if n.endswith(".safetensors")]
    return names


def resolve_siglip(name: str) -> str:
    if name.startswith("clip_vision/"):
        return folder_paths.get_full_path_or_raise("clip_vision", name[len("clip_vision/") :])
    for root in folder_paths.get_folder_paths("siglip"):
        candidate = os.path.join(root, name)
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return folder_paths.get_full_path_or_raise("siglip", name)


def _insightface_roots() -> list[str]:
    return folder_paths.get_folder_paths("insightface")


ADAPTER_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
}


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _scaled_fp8_linear():
    import comfy.ops

    class ScaledFP8Linear(comfy.ops.manual_cast.Linear):
        """A manual-cast Linear whose fp8 weight holds ``weight / weight_scale``: the per-tensor scale puts the small
        weights of a trained adapter into e4m3fn's normal range instead of its subnormals (4x less error)."""

        weight_scale = 1.0

        def forward_comfy_cast_weights(self, input):
            weight, bias, offload_stream = comfy.ops.cast_bias_weight(self, input, offloadable=True)
            out = torch.nn.functional.linear(input, weight * self.weight_scale, bias)
            comfy.ops.uncast_bias_weight(self, weight, bias, offload_stream)
            return out

    return ScaledFP8Linear


def adapter_operations(scaled_fp8: bool = False):
    """ComfyUI's manual-cast layers: weights stay in their storage dtype (bf16, fp8, ...) and are cast to the
    MODEL's compute dtype and device on use, so partial loading and offloading (--lowvram) work."""
    from types import SimpleNamespace

    import comfy.ops

    linear = _scaled_fp8_linear() if scaled_fp8 else comfy.ops.manual_cast.Linear
    return SimpleNamespace(Linear=linear, LayerNorm=comfy.ops.manual_cast.LayerNorm)


def adapter_storage_dtype(choice: str, device) -> torch.dtype:
    """bf16 where the device supports it (the release's dtype; fp16 cannot hold what FLUX computes), else fp32."""
    import comfy.model_management as mm

    if choice not in ADAPTER_DTYPES or (choice != "default" and ADAPTER_DTYPES[choice] is None):
        raise ValueError(f"unknown adapter weight dtype {choice!r}: use one of {', '.join(ADAPTER_DTYPES)}")
    if choice != "default":
        return ADAPTER_DTYPES[choice]
    return mm.unet_dtype(device=device, supported_dtypes=[torch.bfloat16, torch.float32])


def auxiliary_patcher(model: torch.nn.Module, load_device, offload_device):
    """``model`` in the patcher class the running ComfyUI gives its own auxiliary models (CLIP vision,
    ControlNet): ``comfy.model_patcher.CoreModelPatcher`` where it exists (``ModelPatcherDynamic`` when ComfyUI
    started with dynamic VRAM, comfy-aimdo), else ``ModelPatcher`` (ComfyUI before 0.17)."""
    import comfy.model_patcher

    cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return cls(model, load_device=load_device, offload_device=offload_device)


def load_adapter_patcher(path: str, weight_dtype: str = "default"):
    """The adapter in ComfyUI's patcher (:func:`auxiliary_patcher`), so its memory management loads, offloads
    and partially loads it (or, under dynamic VRAM, streams its weights on use).

    fp8 storage is scaled per tensor (the largest weight maps to e4m3fn's largest value)."""
    import comfy.model_management as mm

    from ..withanyone_core.checkpoints.adapter_files import FP8_DTYPES, load_adapter

    load_device = mm.get_torch_device()
    dtype = adapter_storage_dtype(weight_dtype, load_device)
    scales: dict[str, float] = {}

    def scale_for_fp8(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim != 2:  # biases stay unscaled
            return tensor
        tensor = tensor.float()
        scales[key] = max(float(tensor.abs().max()), 1e-12) / FP8_MAX
        return tensor / scales[key]

    scaled = dtype in FP8_DTYPES
    adapter = load_adapter(
        path, dtype=dtype, operations=adapter_operations(scaled_fp8=scaled), transform=scale_for_fp8 if scaled else None
    ).eval()
    for name, module in adapter.named_modules():
        if f"{name}.weight" in scales:
            module.weight_scale = scales[f"{name}.weight"]
    return auxiliary_patcher(adapter, load_device, mm.unet_offload_device())


class WithAnyoneAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneAdapterLoader",
            display_name="Load WithAnyone Adapter",
            category=CATEGORY,
            description="Loads withanyone.safetensors (the identity adapter) from models/withanyone/. ComfyUI "
            "manages it like a model: it is offloaded or partially loaded when VRAM is short.",
            inputs=[
                io.Combo.Input(
                    "adapter_name",
                    options=adapter_choices(),
                    tooltip="withanyone.safetensors from the WithAnyone release, in models/withanyone/",
                ),
                advanced(
                    io.Combo.Input(
                        "weight_dtype",
                        options=list(ADAPTER_DTYPES),
                        default="default",
                        tooltip="storage dtype of the adapter's weights; they are cast to the MODEL's compute dtype on "
                        "use. default: bf16 (fp32 on CPU). fp8_e4m3fn halves the memory (2.8 GB instead of "
                        "5.6 GB) at a small precision cost",
                    )
                ),
            ],
            outputs=[ADAPTER.Output(display_name="adapter", tooltip="the WithAnyone identity adapter")],
        )

    @classmethod
    def execute(cls, adapter_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("withanyone", adapter_name)
        return io.NodeOutput(load_adapter_patcher(path, weight_dtype))


class WithAnyoneFaceAnalyzerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneFaceAnalyzerLoader",
            display_name="Load WithAnyone Face Analyzer (antelopev2)",
            category=CATEGORY,
            description="insightface antelopev2 from models/insightface/models/antelopev2/ "
            "(detection + ArcFace recognition only).",
            inputs=[
                io.Combo.Input(
                    "provider",
                    options=["auto", "CUDA", "CPU"],
                    default="auto",
                    tooltip="onnxruntime device; auto uses CUDA when onnxruntime-gpu offers it",
                ),
                io.Float.Input(
                    "detection_threshold",
                    default=0.4,
                    min=0.05,
                    max=0.95,
                    step=0.05,
                    tooltip="faces detected with a lower score are ignored (the authors use 0.45 in "
                    "their bench, insightface's default 0.5)",
                ),
                io.Int.Input(
                    "detection_size",
                    default=640,
                    min=160,
                    max=1280,
                    step=32,
                    tooltip="the detector's input size; larger finds smaller faces, slower",
                ),
            ],
            outputs=[
                FACE_ANALYZER.Output(
                    display_name="face_analyzer", tooltip="antelopev2 detection + ArcFace, for Face Extract and Layout"
                )
            ],
        )

    @classmethod
    def execute(cls, provider: str, detection_threshold: float, detection_size: int) -> io.NodeOutput:
        from ..withanyone_core.faces import FaceAnalyzer, FaceModelsNotFound, find_antelopev2_dir

        errors = []
        for root in _insightface_roots():
            try:
                find_antelopev2_dir(root)
            except FaceModelsNotFound as exc:
                errors.append(exc)
                continue
            return io.NodeOutput(
                FaceAnalyzer(root, providers=provider.lower(), det_thresh=detection_threshold, det_size=detection_size)
            )
        raise errors[0]  # it lists the expected files and the folder to put them in


class WithAnyoneSiglipLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WithAnyoneSiglipLoader",
            display_name="Load WithAnyone SigLIP",
            category=CATEGORY,
            description="google/siglip-base-patch16-256-i18n: a folder or a single .safetensors in models/siglip/ "
            "(also read from models/clip_vision/).",
            inputs=[
                io.Combo.Input(
                    "siglip_name",
                    options=siglip_choices(),
                    tooltip="google/siglip-base-patch16-256-i18n: a folder (config.json + "
                    "model.safetensors) or one .safetensors in models/siglip/ or "
                    "models/clip_vision/",
                )
            ],
            outputs=[SIGLIP.Output(display_name="siglip", tooltip="the SigLIP image encoder, for Identity Encode")],
        )

    @classmethod
    def execute(cls, siglip_name: str) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..withanyone_core.siglip import SiglipEncoder

        encoder = SiglipEncoder.load(resolve_siglip(siglip_name))
        # a plain container: ModelPatcher sets .device, which transformers models expose as a read-only property
        holder = torch.nn.ModuleDict({"vision": encoder.model})
        patcher = auxiliary_patcher(holder, mm.get_torch_device(), mm.unet_offload_device())
        return io.NodeOutput(SiglipModel(encoder, patcher))


NODES = [WithAnyoneAdapterLoader, WithAnyoneFaceAnalyzerLoader, WithAnyoneSiglipLoader]
