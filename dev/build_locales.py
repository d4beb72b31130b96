"""Build the pack's locales (locales/en/nodeDefs.json, locales/zh/nodeDefs.json) from a real server.

The English file is what the node schemas say, read from a running ComfyUI's /object_info: each node's
display name and description, each input's name and tooltip, each output's name and tooltip (outputs by
index, as the frontend looks them up). The Chinese file translates those strings through ZH below,
keyed by the English text, so a changed tooltip needs a new translation and the build says which.

    .venv/bin/python -m dev.build_locales            # boots ComfyUI 0.3.75 with this pack, writes both
    .venv/bin/python -m dev.build_locales --check    # exit 1 when the files differ from what it would write
    .venv/bin/python -m dev.build_locales --object-info saved.json   # from a saved /object_info answer

Missing translations stop the build with the list of English strings to add to ZH.
tests/web/test_docs_and_locales.py checks against the live server that both files cover every node, input and output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCALES = ROOT / "locales"
PACK_MODULE = "custom_nodes.comfyui-withanyone"  # how ComfyUI names this pack in /object_info
logger = logging.getLogger("build_locales")

# English text -> Simplified Chinese. Type names (MODEL, LATENT, SIGMAS) and formulas stay as they are.
ZH = {
    # node names
    "Load WithAnyone Adapter": "加载 WithAnyone 适配器",
    "Load WithAnyone Face Analyzer (antelopev2)": "加载 WithAnyone 人脸分析器 (antelopev2)",
    "Load WithAnyone SigLIP": "加载 WithAnyone SigLIP",
    "WithAnyone Face Extract": "WithAnyone 人脸提取",
    "WithAnyone Identity Encode": "WithAnyone 身份编码",
    "WithAnyone Multi-ID Layout": "WithAnyone 多人布局",
    "Apply WithAnyone": "应用 WithAnyone",
    "WithAnyone Schedule (authors' sigmas)": "WithAnyone 调度 (作者的 sigmas)",
    "WithAnyone Apply + Sample": "WithAnyone 应用 + 采样",
    "WithAnyone Identity Metrics": "WithAnyone 身份指标",
    # input and output names
    "adapter": "适配器",
    "adapter_name": "适配器文件",
    "weight_dtype": "权重精度",
    "provider": "运行设备",
    "detection_threshold": "检测阈值",
    "detection_size": "检测尺寸",
    "face_analyzer": "人脸分析器",
    "siglip": "SigLIP",
    "siglip_name": "SigLIP 模型",
    "image": "图像",
    "face_index": "人脸序号",
    "min_face_size": "最小人脸尺寸",
    "face_choice": "人脸选择",
    "mask": "遮罩",
    "no_face": "无人脸时",
    "faces": "人脸",
    "preview": "预览",
    "person_1": "人物 1",
    "person_2": "人物 2",
    "person_3": "人物 3",
    "person_4": "人物 4",
    "identities": "身份",
    "width": "宽度",
    "height": "高度",
    "source": "来源",
    "people": "人数",
    "boxes": "人脸框",
    "layout_image": "布局照片",
    "layout_mask": "布局遮罩",
    "image_framing": "照片取景",
    "layout": "布局",
    "person_masks": "每人遮罩",
    "model": "模型",
    "MODEL": "MODEL",
    "siglip_share": "SigLIP 占比",
    "weight_mode": "权重模式",
    "id_weight": "ArcFace 权重",
    "siglip_weight": "SigLIP 权重",
    "start_percent": "开始百分比",
    "end_percent": "结束百分比",
    "steps": "步数",
    "SIGMAS": "SIGMAS",
    "positive": "正向条件",
    "negative": "负向条件",
    "seed": "种子",
    "cfg": "CFG",
    "sampler_name": "采样器",
    "schedule": "调度",
    "guidance": "引导强度",
    "batch_size": "批次大小",
    "LATENT": "LATENT",
    "ground_truth": "真实照片",
    "metrics_json": "指标 JSON",
    # descriptions
    "Loads withanyone.safetensors (the identity adapter) from models/withanyone/. ComfyUI manages it like a "
    "model: it is offloaded or partially loaded when VRAM is short.": "从 models/withanyone/ 加载 withanyone.safetensors（身份适配器）。ComfyUI 像管理模型一样管理它：显存不足时会卸载或部分加载。",
    "insightface antelopev2 from models/insightface/models/antelopev2/ (detection + ArcFace recognition only).": "从 models/insightface/models/antelopev2/ 加载 insightface antelopev2（仅人脸检测与 ArcFace 识别）。",
    "google/siglip-base-patch16-256-i18n: a folder or a single .safetensors in models/siglip/ (also read from "
    "models/clip_vision/).": "google/siglip-base-patch16-256-i18n：models/siglip/ 中的模型文件夹或单个 .safetensors 文件（也读取 models/clip_vision/）。",
    "Finds the reference face in every photo of the batch (one person, several photos allowed; by default the face "
    "with the highest detection score, as the authors do). Outputs the faces and the SigLIP crops; the node shows "
    "which face each photo gave.": "在批次的每张照片中找到参考人脸（同一个人，可用多张照片；默认取检测分数最高的人脸，与作者一致）。输出人脸和 SigLIP 裁剪图；节点上会显示每张照片用了哪张脸。",
    "Persons 1-4, in order without gaps (person k goes into layout box k). Several photos of one person: their raw "
    "ArcFace embeddings and SigLIP features are averaged.": "人物 1-4，按顺序连接且不留空（人物 k 对应布局中的第 k 个框）。同一人的多张照片：对其原始 ArcFace 嵌入和 SigLIP 特征取平均。",
    "Where each person's face goes: boxes from text, a preset for 1-4 people, the faces of an example photo, or the "
    "regions of a mask. Box k belongs to identity k; boxes from a photo or a mask are numbered left to right. Also "
    "outputs one mask per person and their union.": "每个人的脸放在哪里：来自文本的框、1-4 人的预设、示例照片中的人脸，或遮罩中的区域。第 k 个框属于第 k 个身份；来自照片或遮罩的框从左到右编号。同时输出每人一张遮罩及其并集。",
    "Patches a FLUX.1 MODEL (a clone; the input MODEL is untouched) so each person's face box attends to that "
    "person's identity. Use it with SamplerCustomAdvanced and the WithAnyone Schedule node for the authors' "
    "results; the stock KSampler and LoRA loaders work too. A block patch already on the MODEL (another pack's, or "
    "an earlier Apply WithAnyone) keeps working: a second Apply adds its people.": "给 FLUX.1 MODEL 打补丁（作用于副本，输入的 MODEL 不变），让每个人的人脸框关注该人的身份。配合 SamplerCustomAdvanced 和 WithAnyone 调度节点可复现作者的结果；自带的 KSampler 和 LoRA 加载器同样可用。MODEL 上已有的块补丁（其他插件的，或之前的应用 WithAnyone）继续生效：第二个应用节点会加入它的人物。",
    "The authors' noise schedule for an image size, as SIGMAS for SamplerCustomAdvanced: t = linspace(1, 0, steps "
    "+ 1) shifted with mu = 0.5 + (seq - 256) * 0.65 / 3840, seq = (W / 8) * (H / 8) // 256 (about 0.46, where "
    "ComfyUI's FLUX default shift is 1.15).": "作者针对图像尺寸的噪声调度，作为 SamplerCustomAdvanced 的 SIGMAS：t = linspace(1, 0, steps + 1)，按 mu = 0.5 + (seq - 256) * 0.65 / 3840 偏移，seq = (W / 8) * (H / 8) // 256（约 0.46，而 ComfyUI 的 FLUX 默认偏移为 1.15）。",
    "All in one, with the authors' recipe by default (their schedule, 25 Euler steps, guidance 4.0, no CFG): applies "
    "WithAnyone and samples with ComfyUI's own sampling code; the image size comes from the layout. Shows progress "
    "and live previews.": "一体化节点，默认使用作者的配方（作者的调度、25 步 Euler、引导 4.0、不用 CFG）：应用 WithAnyone 并用 ComfyUI 自己的采样代码采样；图像尺寸取自布局。显示进度和实时预览。",
    "Sim(Ref), Sim(GT) and the copy-paste score CP (+1: a copy of the reference, -1: the ground truth) per person, "
    "for each generated image, as MultiID-Bench computes them.": "按 MultiID-Bench 的算法，为每张生成图中的每个人计算 Sim(Ref)、Sim(GT) 和复制粘贴分数 CP（+1：照搬参考照，-1：像真实照片）。",
    # tooltips
    "withanyone.safetensors from the WithAnyone release, in models/withanyone/": "WithAnyone 发布的 withanyone.safetensors，放在 models/withanyone/",
    "storage dtype of the adapter's weights; they are cast to the MODEL's compute dtype on use. default: bf16 (fp32 "
    "on CPU). fp8_e4m3fn halves the memory (2.8 GB instead of 5.6 GB) at a small precision cost": "适配器权重的存储精度；使用时转换为 MODEL 的计算精度。default：bf16（CPU 上为 fp32）。fp8_e4m3fn 内存减半（2.8 GB 而不是 5.6 GB），精度略有损失",
    "the WithAnyone identity adapter": "WithAnyone 身份适配器",
    "onnxruntime device; auto uses CUDA when onnxruntime-gpu offers it": "onnxruntime 设备；auto 在 onnxruntime-gpu 可用时使用 CUDA",
    "photos of ONE person (a batch of several photos is averaged)": "同一个人的照片（多张照片的批次会取平均）",
    "which face of a photo with several, counted in the face_choice order: 0 = the first (-1, from older workflows, "
    "is the same as 0)": "照片中有多张脸时取哪一张，按人脸选择的顺序计数：0 = 第一张（旧工作流中的 -1 与 0 相同）",
    "ignore faces whose shorter side is below this many pixels": "忽略短边小于此像素数的人脸",
    "how the faces of a photo are ranked: highest score (the authors' choice: the detector's most confident face), "
    "largest, or left to right": "照片中人脸的排序方式：最高分（作者的选择：检测器最有把握的人脸）、最大，或从左到右",
    "optional: white = the person, black = background (e.g. from a background-removal node), one per photo or one "
    "for all. The SigLIP crop's background is blanked to black, as the authors' BiRefNet matting does; the ArcFace "
    "embedding is unchanged. Recommended when the SigLIP share is above 0": "可选：白色 = 人物，黑色 = 背景（例如来自去背景节点），每张照片一张或全部共用一张。SigLIP 裁剪图的背景会被涂黑，与作者的 BiRefNet 抠图相同；ArcFace 嵌入不变。SigLIP 占比大于 0 时推荐使用",
    "a photo without a usable face: error stops the run; skip leaves it out (named in the log and on the node). All "
    "photos without one is an error": "照片中没有可用人脸时：error 停止运行；skip 跳过该照片（在日志和节点上注明）。所有照片都没有人脸仍然是错误",
    "the SigLIP crops (512 px, background blanked where a mask is given), one per photo with a face": "SigLIP 裁剪图（512 像素，给了遮罩时背景涂黑），每张有人脸的照片一张",
    "output width in pixels (the authors' demo: 768)": "输出宽度（像素，作者的演示为 768）",
    "output height in pixels (the authors' demo: 768)": "输出高度（像素，作者的演示为 768）",
    "preset: side-by-side faces for `people`; text: the boxes below; image: the faces of layout_image; mask: the "
    "regions of layout_mask": "preset：按人数并排的人脸；text：下方文本中的框；image：布局照片中的人脸；mask：布局遮罩中的区域",
    "preset: how many people. image / mask: the most faces / regions taken (image: those with the highest detection "
    "scores; mask: the largest regions), numbered left to right": "preset：人数。image / mask：最多取多少张脸 / 多少个区域（image：检测分数最高的；mask：最大的区域），从左到右编号",
    "text: one x1,y1,x2,y2 per line; all four within 0-1 = fractions of the size, otherwise pixels (a line mixing "
    "the two is refused)": "text：每行一个 x1,y1,x2,y2；四个数都在 0-1 之间表示尺寸的比例，否则为像素（混用两者的行会被拒绝）",
    "image: a photo with the people placed": "image：人物已摆好位置的照片",
    "image: finds the faces": "image：用于查找人脸",
    "mask: one white blob per person's face (painted, or from a segmentation node), stretched to the output size": "mask：每个人的脸一块白色区域（手绘，或来自分割节点），拉伸到输出尺寸",
    "image: how the photo is framed in the output. square (the authors'): a square of the photo holding every face, "
    "scaled uniformly and centred in the output; fill: a window of the output's aspect ratio, so a wide output is "
    "filled. Either way the window grows when the faces do not fit, so every face lands inside the output.": "image：照片在输出中的取景方式。square（作者的方式）：照片中包含所有人脸的正方形，等比缩放并居中；fill：与输出宽高比相同的窗口，宽幅输出也能填满。两种方式下人脸放不下时窗口都会扩大，保证每张脸都在输出之内。",
    "the numbered boxes (over the layout photo or mask when there is one)": "带编号的人脸框（有布局照片或遮罩时画在其上）",
    "one mask per person (batch of n), 1 inside that person's box, at the output size": "每人一张遮罩（n 张的批次），该人的框内为 1，尺寸与输出相同",
    "the union of the boxes at the output size": "所有框的并集，尺寸与输出相同",
    "a FLUX.1 model (dev or a fine-tune), fp8/GGUF loaders included": "FLUX.1 模型（dev 或其微调版），包括 fp8/GGUF 加载器",
    "from Load WithAnyone Adapter": "来自加载 WithAnyone 适配器",
    "from WithAnyone Identity Encode: person k goes into box k": "来自 WithAnyone 身份编码：人物 k 对应第 k 个框",
    "face boxes; without a layout every image token sees every person. A layout drawn for another size is scaled "
    "uniformly and centred": "人脸框；没有布局时每个图像 token 都会看到所有人。为其他尺寸画的布局会等比缩放并居中",
    "The authors' single control, 'resemblance in spirit <-> in form'. 0 (default, the authors' recommendation): "
    "only the ArcFace branch - identity features, pose and expression follow the prompt. 1: only the SigLIP branch "
    "- the reference photo's appearance, closer likeness but more copy-paste. ArcFace gets 1 - share, SigLIP gets "
    "share.": "作者的单一控制，“神似 <-> 形似”。0（默认，作者推荐）：只用 ArcFace 分支——身份特征，姿态和表情跟随提示词。1：只用 SigLIP 分支——参考照的外观，更像但更容易照搬。ArcFace 得到 1 - 占比，SigLIP 得到占比。",
    "share (default, as the authors): one slider, siglip_share. independent: id_weight and siglip_weight as given "
    "(their sum above 1 strengthens the identity beyond what was trained)": "share（默认，与作者一致）：一个滑块，即 SigLIP 占比。independent：按给定的 ArcFace 权重和 SigLIP 权重（两者之和大于 1 会让身份强于训练时的强度）",
    "independent mode only: weight of the ArcFace branch (identity 'in spirit'); 0 turns it off": "仅 independent 模式：ArcFace 分支（“神似”）的权重；0 表示关闭",
    "independent mode only: weight of the SigLIP branch (appearance 'in form'); 0 turns it off": "仅 independent 模式：SigLIP 分支（“形似”）的权重；0 表示关闭",
    "identities act from this point of the schedule (0 = the first step)": "身份从调度的这一点开始生效（0 = 第一步）",
    "identities act until this point of the schedule (1 = the last step)": "身份生效到调度的这一点（1 = 最后一步）",
    "the patched clone of the MODEL": "打过补丁的 MODEL 副本",
    "Euler steps (the authors use 25)": "Euler 步数（作者用 25）",
    "output width in pixels (ignored when a layout is connected)": "输出宽度（像素，连接布局时忽略）",
    "output height in pixels (ignored when a layout is connected)": "输出高度（像素，连接布局时忽略）",
    "take the size from this layout": "从此布局获取尺寸",
    "steps + 1 sigmas from 1 down to 0": "从 1 降到 0 的 steps + 1 个 sigma",
    "a FLUX.1 model (dev or a fine-tune)": "FLUX.1 模型（dev 或其微调版）",
    "the prompt (CLIP Text Encode with FLUX's encoders)": "提示词（用 FLUX 编码器的 CLIP 文本编码）",
    "used only when cfg > 1": "仅在 cfg > 1 时使用",
    "face boxes; also fixes the image size": "人脸框；同时决定图像尺寸",
    "noise seed (ComfyUI's noise, as the stock KSampler makes it)": "噪声种子（与自带 KSampler 生成的 ComfyUI 噪声相同）",
    "sampling steps (the authors use 25)": "采样步数（作者用 25）",
    "1.0 for FLUX.1-dev (guidance-distilled, the authors' setting); >1 also runs the negative and doubles the time": "FLUX.1-dev 用 1.0（引导蒸馏模型，作者的设置）；大于 1 时还会运行负向条件，耗时加倍",
    "euler is the authors' sampler": "euler 是作者使用的采样器",
    "the authors' schedule for this image size (default), or one of ComfyUI's schedulers on the MODEL's own sampling "
    "(FLUX shift 1.15)": "针对此图像尺寸的作者调度（默认），或使用 MODEL 自身采样设置（FLUX 偏移 1.15）的 ComfyUI 调度器之一",
    "FLUX guidance (the distilled guidance embedding); the authors use 4.0": "FLUX 引导强度（蒸馏的引导嵌入）；作者用 4.0",
    "images per run, each with its own noise": "每次运行的图像数，每张有自己的噪声",
    "decode with VAE Decode": "用 VAE 解码",
    "generated image(s)": "生成的图像",
    "a real photo of the same people (for CP)": "同一批人的真实照片（用于 CP）",
    # added with Save/Load Identity, ArcFace Identities, Face Edit Prepare and new tooltips
    "0: the photo's own size (the authors'). Else the photo is first scaled to about this many megapixels (1.0 ~ 1024 x 1024), for large phone photos": "0：照片自身的尺寸（作者的做法）。否则先把照片缩放到约这么多百万像素（1.0 ≈ 1024 x 1024），适合手机拍的大照片",
    "A person saved with Save WithAnyone Identity (models/withanyone/identities/). Needs neither the face analyzer nor SigLIP. Connect person to an Identity Encode person_k slot to mix saved and new people, or identities straight to Apply WithAnyone for this person alone.": "用保存 WithAnyone 身份节点保存的人物（models/withanyone/identities/）。既不需要人脸分析器也不需要 SigLIP。把人物连接到身份编码的 person_k 输入，可以混用已保存和新的人物；或把身份直接连到应用 WithAnyone，只用这一个人。",
    "ArcFace-only identities (no SigLIP), for a WithAnyone.Ke adapter": "仅 ArcFace 的身份（无 SigLIP），用于 WithAnyone.Ke 适配器",
    "Encodes one person (all photos of the Face Extract batch, as Identity Encode does) and saves the result as models/withanyone/identities/<name>.safetensors: ArcFace embeddings, SigLIP features, the photos' hashes and face boxes. Load WithAnyone Identity uses it again without the face analyzer or SigLIP. Connect its output to Identity Encode.": "编码一个人（人脸提取批次中的所有照片，与身份编码相同），并保存为 models/withanyone/identities/<名字>.safetensors：ArcFace 嵌入、SigLIP 特征、照片的哈希值和人脸框。加载 WithAnyone 身份节点无需人脸分析器和 SigLIP 即可再次使用它。把它的输出连接到身份编码。",
    "Gaussian blur radius in pixels (the authors: 15)": "高斯模糊半径（像素，作者用 15）",
    "Load WithAnyone Identity": "加载 WithAnyone 身份",
    "Persons 1-4 (in order, person k goes into layout box k) as ArcFace embeddings only, for WithAnyone.Ke, which has no SigLIP branch: no SigLIP model needed. Several photos of one person are averaged.": "人物 1-4（按顺序，人物 k 对应布局中的第 k 个框），只用 ArcFace 嵌入，供没有 SigLIP 分支的 WithAnyone.Ke 使用：不需要 SigLIP 模型。同一人的多张照片取平均。",
    "Save WithAnyone Identity": "保存 WithAnyone 身份",
    "Sim(Ref), Sim(GT) and CP per person, as JSON": "每个人的 Sim(Ref)、Sim(GT) 和 CP，JSON 格式",
    "The authors' face-edit recipe for WithAnyone.Ke on FLUX.1 Kontext: finds up to 4 faces in the source photo, blurs those of at least 100 px (Gaussian, radius 15) and returns the blurred photo (feed it through VAE Encode into ReferenceLatent) and the faces' layout (box k = identity k) at the target size (the photo's, floored to multiples of 16).": "作者在 FLUX.1 Kontext 上用 WithAnyone.Ke 换脸的配方：在源照片中找到最多 4 张脸，把至少 100 像素的脸模糊（高斯，半径 15），返回模糊后的照片（经 VAE 编码送入 ReferenceLatent）和这些脸在目标尺寸下的布局（第 k 个框 = 第 k 个身份），目标尺寸为照片尺寸向下取整到 16 的倍数。",
    "WithAnyone ArcFace Identities": "WithAnyone ArcFace 身份",
    "WithAnyone Face Edit Prepare (Kontext)": "WithAnyone 换脸准备 (Kontext)",
    "a saved person in models/withanyone/identities/": "models/withanyone/identities/ 中已保存的人物",
    "antelopev2 detection + ArcFace, for Face Extract and Layout": "antelopev2 检测 + ArcFace，供人脸提取和布局使用",
    "aspect_limit": "宽高比限制",
    "authors: the boxes as the authors' demo computes them (through a 512 px square and back, in integers; under 2 px from the detector's). exact: the detector's boxes": "authors：按作者演示的方式计算框（经 512 像素正方形来回换算，取整；与检测器的框相差不到 2 像素）。exact：检测器的框",
    "blur_radius": "模糊半径",
    "box_mapping": "框的换算",
    "face boxes in output pixels, box k for person k; also the image size": "以输出像素表示的人脸框，第 k 个框对应人物 k；同时决定图像尺寸",
    "face_order": "人脸顺序",
    "faces at least this many pixels wide and high are blurred (the authors: 100); smaller ones are edited but not blurred": "宽和高都至少为这么多像素的人脸会被模糊（作者用 100）；更小的人脸会被编辑但不模糊",
    "faces detected with a lower score are ignored (the authors use 0.45 in their bench, insightface's default 0.5)": "检测分数更低的人脸会被忽略（作者在评测中用 0.45，insightface 默认 0.5）",
    "faces of person 1 (layout box 1), from Face Extract or Load Identity": "人物 1（布局第 1 个框）的人脸，来自人脸提取或加载身份",
    "faces of person 1 (layout box 1), from Face Extract, or a saved person from Load WithAnyone Identity": "人物 1（布局第 1 个框）的人脸，来自人脸提取，或来自加载 WithAnyone 身份的已保存人物",
    "finds and embeds the generated faces": "查找并嵌入生成图中的人脸",
    "from Load WithAnyone Face Analyzer": "来自加载 WithAnyone 人脸分析器",
    "from Load WithAnyone Face Analyzer (antelopev2)": "来自加载 WithAnyone 人脸分析器 (antelopev2)",
    "from Load WithAnyone SigLIP (the features are saved with the person)": "来自加载 WithAnyone SigLIP（特征随人物一起保存）",
    "from Load WithAnyone SigLIP; only people fresh from Face Extract need it (saved identities from Load WithAnyone Identity are already encoded)": "来自加载 WithAnyone SigLIP；只有直接来自人脸提取的人物需要它（来自加载 WithAnyone 身份的已保存身份已经编码过）",
    "google/siglip-base-patch16-256-i18n: a folder (config.json + model.safetensors) or one .safetensors in models/siglip/ or models/clip_vision/": "google/siglip-base-patch16-256-i18n：models/siglip/ 或 models/clip_vision/ 中的文件夹（config.json + model.safetensors）或单个 .safetensors 文件",
    "how many faces are edited (connect that many persons)": "编辑了多少张脸（请连接同样数量的人物）",
    "identity_name": "身份名称",
    "megapixels": "百万像素",
    "min_blur_face": "最小模糊人脸",
    "name": "名字",
    "one person's faces, from Face Extract": "一个人的人脸，来自人脸提取",
    "one reference face per photo: its ArcFace embedding and SigLIP crop, for Identity Encode": "每张照片一张参考人脸：其 ArcFace 嵌入和 SigLIP 裁剪图，供身份编码使用",
    "overwrite": "覆盖",
    "person": "人物",
    "person 2 (box 2); connect persons in order": "人物 2（第 2 个框）；请按顺序连接人物",
    "person 3 (box 3); needs person 2": "人物 3（第 3 个框）；需要先连接人物 2",
    "person 4 (box 4); needs person 3": "人物 4（第 4 个框）；需要先连接人物 3",
    "reference": "参考图",
    "replace a saved person of this name whose identity differs (saving the same identity again is always fine)": "替换同名但身份不同的已保存人物（再次保存相同的身份总是可以的）",
    "the SigLIP image encoder, for Identity Encode": "SigLIP 图像编码器，供身份编码使用",
    "the authors accept only near-square photos (aspect 0.9-1.1; the model was trained on square ones). 'off' lifts it: the pack maps boxes and tokens correctly at any aspect, results may be weaker": "作者只接受接近正方形的照片（宽高比 0.9-1.1；模型是在正方形图上训练的）。'off' 取消此限制：本插件在任何宽高比下都能正确换算框和 token，但效果可能较弱",
    "the blurred photo at the target size: VAE Encode -> ReferenceLatent": "目标尺寸下的模糊照片：VAE 编码 -> ReferenceLatent",
    "the detector's input size; larger finds smaller faces, slower": "检测器的输入尺寸；越大越能找到小脸，但更慢",
    "the faces' boxes at the target size": "目标尺寸下的人脸框",
    "the person's name; the file is <name>.safetensors in models/withanyone/identities/": "人物的名字；文件为 models/withanyone/identities/ 中的 <名字>.safetensors",
    "the persons in order, for Apply WithAnyone / the sampler": "按顺序排列的人物，供应用 WithAnyone / 采样节点使用",
    "the photo with the numbered boxes": "带编号人脸框的照片",
    "the reference persons the image was made with": "生成图像时使用的参考人物",
    "the same person, already encoded: connect to Identity Encode": "同一个人，已编码：连接到身份编码",
    "the saved person, already encoded: connect to Identity Encode person_k": "已保存的人物，已编码：连接到身份编码的 person_k",
    "the source photo whose faces are replaced (one photo)": "要替换人脸的源照片（一张）",
    "this person alone, for Apply WithAnyone / the sampler": "只有这一个人，供应用 WithAnyone / 采样节点使用",
    "which face is box 1, 2, ...: the detector's order, highest score first (the authors'), or left to right. The preview numbers them": "哪张脸是第 1、2……个框：检测器的顺序，分数最高的在前（作者的做法），或从左到右。预览图上会给它们编号",
}


def _inputs(info: dict) -> list[tuple[str, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, options))
    return out


def english_node_defs(object_info: dict, module: str = PACK_MODULE) -> dict:
    """locales/en/nodeDefs.json for this pack's nodes in an /object_info answer."""
    defs = {}
    for node_id, info in object_info.items():
        if info.get("python_module") != module:
            continue
        entry = {"display_name": info["display_name"]}
        if info.get("description"):
            entry["description"] = info["description"]
        entry["inputs"] = {}
        for name, options in _inputs(info):
            entry["inputs"][name] = {"name": name}
            if options.get("tooltip"):
                entry["inputs"][name]["tooltip"] = options["tooltip"]
        tooltips = info.get("output_tooltips") or []
        entry["outputs"] = {}
        for index, name in enumerate(info.get("output_name") or info.get("output") or []):
            entry["outputs"][str(index)] = {"name": name}
            if index < len(tooltips) and tooltips[index]:
                entry["outputs"][str(index)]["tooltip"] = tooltips[index]
        defs[node_id] = entry
    return defs


def translate(defs: dict, table: dict) -> tuple[dict, list[str]]:
    """The same structure with every string looked up in ``table``; also the strings it lacks."""
    missing = []

    def tr(text: str) -> str:
        if text not in table:
            missing.append(text)
            return text
        return table[text]

    out = {}
    for node_id, entry in defs.items():
        node = {key: tr(entry[key]) for key in ("display_name", "description") if key in entry}
        for part in ("inputs", "outputs"):
            node[part] = {k: {field: tr(v) for field, v in slot.items()} for k, slot in entry[part].items()}
        out[node_id] = node
    return out, sorted(set(missing))


def live_object_info() -> dict:
    """/object_info of ComfyUI booted with this pack (tools/common/comfy_server.py)."""
    from tools.common.comfy_server import ComfyServer

    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as comfy:
        return comfy.get_json("/object_info")


def render(defs: dict) -> str:
    return json.dumps(defs, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", type=Path, help="a saved /object_info answer instead of booting ComfyUI")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the files are out of date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = json.loads(args.object_info.read_text()) if args.object_info else live_object_info()
    english = english_node_defs(info)
    if not english:
        parser.error(f"no node of {PACK_MODULE} in /object_info (did the pack fail to load?)")
    chinese, missing = translate(english, ZH)
    if missing:
        logger.error(
            "no Chinese translation for %d strings; add them to ZH in dev/build_locales.py:\n%s",
            len(missing),
            "\n".join(f'    {text!r}: "",' for text in missing),
        )
        return 1
    stale = []
    for lang, defs in (("en", english), ("zh", chinese)):
        path = LOCALES / lang / "nodeDefs.json"
        text = render(defs)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(str(path.relative_to(ROOT)))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    unused = sorted(set(ZH) - {s for s in _strings(english)})
    if unused:
        logger.info("%d translations in ZH are no longer used (safe to delete): %s", len(unused), unused)
    if args.check:
        if stale:
            logger.error("out of date: %s; run dev/build_locales.py", ", ".join(stale))
        return 1 if stale else 0
    logger.info("wrote %s (%d nodes)", ", ".join(stale) or "nothing (up to date)", len(english))
    return 0


def _strings(defs: dict):
    for entry in defs.values():
        yield from (entry[k] for k in ("display_name", "description") if k in entry)
        for part in ("inputs", "outputs"):
            for slot in entry[part].values():
                yield from slot.values()


if __name__ == "__main__":
    sys.exit(main())
