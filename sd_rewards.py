"""Rewards for the Stable Diffusion rung: r(x_0) = log R(x_0), differentiable in the pixels, in float32.

Every reward is a module `reward(images, prompts) -> r`: images (N, 3, H, W) in [-1, 1] (the VAE's
output), prompts a list of N strings — row i is scored with prompts[i], its own trajectory's prompt —
and r (N,) float32. Each runs and is differentiated in float32 (the paper's authors found bf16 reward
gradients badly wrong), and preprocesses in plain torch what the model's own processor does with PIL
or torchvision (resize the shorter side, bicubic and antialiased; centre crop; mean/std), so that the
gradient reaches the pixels. The tests check each preprocessing against the model's own processor.

  aesthetic    the paper's main reward: LAION improved aesthetic predictor, an MLP on the L2-normalised
               CLIP ViT-L/14 image embedding (openai/clip-vit-large-patch14 + sac+logos+ava1-l14-linearMSE.pth);
               r on its 1–10 scale; ignores the prompt.
  hpsv2        HPSv2.1: open_clip ViT-H-14 finetuned on human preferences (xswu/HPSv2, HPS_v2.1_compressed.pt);
               r = cos(image, prompt), HPSv2's own score.
  pickscore    PickScore v1 as a transformers CLIPModel (yuvalkirstain/PickScore_v1) with the preprocessing
               of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor; r = exp(logit_scale)·cos(image, prompt),
               its authors' score.
  imagereward  ImageReward v1.0 (THUDM/ImageReward: ImageReward.pt + med_config.json; bert-base-uncased's
               tokenizer): BLIP ViT-L/16 tokens, cross-attended by a BERT encoder of the prompt, an MLP on
               its [CLS] state, standardised with the authors' mean and std.
  clip-score   r = cos(CLIP ViT-L/14 image embedding, its embedding of the prompt).

ImageReward is rebuilt on transformers' BLIP classes (`BlipVisionModel` for its ViT-L/16, `BlipTextModel`
with cross-attention for its BERT encoder): the `image-reward` package does not import with
transformers 5. `IMAGEREWARD_KEYS` maps every key of the authors' checkpoint onto those classes; the
tests check it covers all 625 keys of the authors' module and that a tiny model gives the authors'
scores (tests/data/imagereward_reference.json, made by their own code).

Weights come from a hub id, a local folder or a local file (`Source`: the value plus the flag and
environment variable that set it, so that a missing weight stops with one line naming both). The tiny
random builds of each architecture (`--model tiny`, smoke tests) live in tiny_models.py; they are saved
in the same formats and loaded by the same functions as the real weights.

Deliberate differences from the rewards' own code: all run in float32 (HPSv2's and ImageReward's
scripts use autocast / their defaults); text features are computed once per distinct prompt and
cached (they do not depend on the image).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import urllib.error
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import diffusers
import huggingface_hub
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel,
                          CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer)

TINY = "tiny"
REWARDS = ("aesthetic", "hpsv2", "pickscore", "imagereward", "clip-score")

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
HPSV2_HUB_ID, HPSV2_FILE, HPSV2_ARCH = "xswu/HPSv2", "HPS_v2.1_compressed.pt", "ViT-H-14"
PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGEREWARD_HUB_ID, IMAGEREWARD_FILE, IMAGEREWARD_MED_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"
IMAGEREWARD_TOKENIZER_HUB_ID = "bert-base-uncased"
# ImageReward v1.0's vision tower: BLIP's ViT-L/16 at 224 (hard-coded in the authors' code, not in the
# checkpoint). A vision_config.json beside ImageReward.pt overrides it (the tiny build has one).
IMAGEREWARD_VIT_L = dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                         num_attention_heads=16, intermediate_size=4096)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # the authors' standardisation
IMAGEREWARD_MAX_TOKENS = 35  # the authors' tokenizer call: padding="max_length", truncation, max_length=35
# CLIP's image normalisation (OpenAI's constants; also open_clip's, ImageReward's and the laion processor's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingWeights(Exception):
    """A model or reward weight cannot be loaded: reported as one line, exit status 1."""


@dataclass(frozen=True)
class Source:
    """Where a weight comes from — a hub id, a local folder or a local file — and how a user sets it."""

    value: str
    flag: str
    env: str
    trust_pickle: bool = False  # --trust-pickle: torch.load with weights_only=False (runs a pickle's code)

    def hint(self) -> str:
        return f"pass {self.flag} or set {self.env}"


# ----------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------


@contextmanager
def quiet_library_logs():
    """Silence diffusers/transformers warnings while loading (e.g. "couldn't connect to the Hub"), so
    that a missing weight is reported in our one line."""
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def hub_file(source: Source, filename: str, what: str) -> Path:
    """A local copy of `filename`: source.value is that file, a folder holding it (or a file beside it),
    or a hub repo id (downloaded once into the hub cache; with HF_HUB_OFFLINE=1 only the cache is used)."""
    path = Path(source.value)
    if path.is_file() and path.name == filename:
        return path
    folder = path.parent if path.is_file() else path
    if not folder.exists() and source.value.startswith(("/", ".", "~")):
        raise MissingWeights(f"{what} {source.value!r} not found: {source.hint()} with a folder holding {filename}")
    if folder.is_dir():
        if (folder / filename).is_file():
            return folder / filename
        raise MissingWeights(f"{what}: {source.value!r} holds no {filename}: {source.hint()} with a folder that does")
    try:
        return Path(huggingface_hub.hf_hub_download(source.value, filename))
    except (OSError, ValueError) as err:
        raise MissingWeights(
            f"cannot load {what} {source.value!r} ({type(err).__name__}): {source.hint()} with a local folder or "
            f"file, or download {filename} of a hub id while online (HF_HUB_OFFLINE=1 forbids it)") from None


def from_pretrained(cls, source: Source, what: str, default_id: str, **kwargs):
    """cls.from_pretrained(source.value), a missing weight reported in one line."""
    try:
        with quiet_library_logs():
            return cls.from_pretrained(source.value, **kwargs)
    except (OSError, ValueError) as err:
        raise MissingWeights(
            f"cannot load {what} {source.value!r} ({type(err).__name__}): {source.hint()} with a local folder, "
            f"or download the hub id {default_id!r} while online (HF_HUB_OFFLINE=1 forbids it)") from None


def torch_load(path: Path, what: str, trust_pickle: bool = False):
    """torch.load(path) with weights_only=True; a file that needs more (a pickle of other objects, whose
    loading can run code) stops with one line naming --trust-pickle, never a silent fallback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused is None:  # a corrupt file, not a refused one
            raise MissingWeights(f"{what} {str(path)!r} does not load (a broken or non-torch file)") from None
        raise MissingWeights(f"{what} {str(path)!r} does not load with torch.load(weights_only=True): it pickles "
                             f"{refused.group(1)}, and loading a pickle can run code; if you trust the file, pass "
                             f"--trust-pickle") from None
    except Exception as err:  # a truncated download or another format: one line, not a traceback
        raise MissingWeights(f"{what} {str(path)!r} does not load ({type(err).__name__}: {err})") from None


def load_state(path: Path, what: str, trust_pickle: bool = False) -> Dict[str, Tensor]:
    """A checkpoint's tensors (`torch_load`), unwrapped from {'state_dict': ...} and DDP's 'module.'."""
    state = torch_load(path, what, trust_pickle)
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> nn.Module:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        details = " ".join(str(err).split())[:300]
        raise MissingWeights(f"{str(path)!r} is not a {what} checkpoint ({details})") from None
    return module


# ----------------------------------------------------------------------------------------------
# Preprocessing (plain torch, differentiable) and per-prompt text features
# ----------------------------------------------------------------------------------------------


class ImagePreprocess(nn.Module):
    """Images in [-1, 1] → a vision tower's input: the shorter side resized to `size` (bicubic,
    antialiased, like PIL's and torchvision's resize), a centre crop of `crop`, then (x − mean)/std.

    The crop's offset, (H − crop)/2, is rounded as torchvision's CenterCrop does (`round`: OpenAI CLIP,
    HPSv2, ImageReward) or as transformers' image processors do (`floor`: PickScore's); they differ by
    a pixel when H − crop is odd.
    """

    def __init__(self, size: int, crop: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 center: str = "round"):
        super().__init__()
        self.size, self.crop, self.center = size, crop, center
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, processor: CLIPImageProcessor) -> "ImagePreprocess":
        """The settings of a transformers CLIP image processor (which must resize bicubic and centre-crop)."""
        if processor.resample != 3 or not processor.do_center_crop or processor.size.shortest_edge is None:
            raise MissingWeights(f"unsupported image processor settings (resample={processor.resample}, "
                                 f"center crop={processor.do_center_crop}, size={processor.size})")
        return cls(processor.size.shortest_edge, processor.crop_size.height, processor.image_mean, processor.image_std,
                   center="floor")

    def forward(self, images: Tensor) -> Tensor:  # (N, 3, H, W) → (N, 3, crop, crop)
        x = ((images.float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        long_size = int(self.size * long / short)  # truncated, as torchvision and transformers do
        new = (self.size, long_size) if h <= w else (long_size, self.size)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        top, left = ((n - self.crop) // 2 if self.center == "floor" else round((n - self.crop) / 2) for n in x.shape[-2:])
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std


class PromptCache:
    """Text features computed once per distinct prompt (they do not depend on the image), no grad."""

    def __init__(self, encode: Callable[[List[str]], Tensor]):
        self.encode, self.store = encode, {}

    def __call__(self, prompts: Sequence[str]) -> Tensor:  # N prompts → (N, ...)
        missing = sorted(set(prompts) - self.store.keys())
        if missing:
            with torch.no_grad():
                self.store.update(zip(missing, self.encode(missing)))
        return torch.stack([self.store[p] for p in prompts])


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ----------------------------------------------------------------------------------------------
# CLIP rewards: aesthetic (the paper's), clip-score, PickScore
# ----------------------------------------------------------------------------------------------


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (sac+logos+ava1-l14-linearMSE), on an
    L2-normalised CLIP ViT-L/14 image embedding. State-dict keys layers.{0,2,4,6,7}.{weight,bias}.
    ImageReward's head is the same MLP (its authors built on this predictor's code) on BLIP's [CLS]."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:  # (N, D) → (N,)
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def from_file(cls, path, embed_dim: int, trust_pickle: bool = False) -> "AestheticHead":
        head = cls(embed_dim)
        head.load_state_dict(torch_load(path, "aesthetic head", trust_pickle), strict=True)
        return head.eval().requires_grad_(False)


class ClipEmbedder(nn.Module):
    """L2-normalised CLIP image and text embeddings, differentiable in the image, float32.

    The default preprocessing is CLIP's own at the vision tower's input size (224 for ViT-L/14: shorter
    side to 224, bicubic, centre crop, CLIP mean/std); PickScore passes its processor's.
    """

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizer, preprocess: Optional[ImagePreprocess] = None):
        super().__init__()
        self.clip, self.tokenizer = clip.eval().requires_grad_(False).float(), tokenizer
        size = clip.config.vision_config.image_size
        self.preprocess = preprocess or ImagePreprocess(size, size)
        self.text_embeds = PromptCache(self._encode_text)  # N prompts → (N, D)

    def image_embeds(self, images: Tensor) -> Tensor:  # (N, 3, H, W) → (N, D)
        pooled = self.clip.vision_model(pixel_values=self.preprocess(images)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def _encode_text(self, prompts: List[str]) -> Tensor:
        # No attention mask needed: CLIP's text tower is causal and pools at the first end-of-text token.
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(module_device(self.clip))
        pooled = self.clip.text_model(input_ids=ids).pooler_output
        return F.normalize(self.clip.text_projection(pooled), dim=-1)


class AestheticReward(nn.Module):
    """r(image) = aesthetic MLP(normalised CLIP image embedding). Ignores the prompt."""

    def __init__(self, embedder: ClipEmbedder, head: AestheticHead):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(self.embedder.image_embeds(images))


class ClipScoreReward(nn.Module):
    """r(image, prompt) = scale · cos(CLIP image embedding, CLIP text embedding of the row's own prompt);
    scale = 1 for clip-score, exp(logit_scale) for PickScore (its authors' score)."""

    def __init__(self, embedder: ClipEmbedder, use_logit_scale: bool = False):
        super().__init__()
        self.embedder, self.use_logit_scale = embedder, use_logit_scale

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        cosine = (self.embedder.image_embeds(images) * self.embedder.text_embeds(prompts)).sum(-1)
        return cosine * self.embedder.clip.logit_scale.exp() if self.use_logit_scale else cosine


def load_clip(source: Source, device, default_id: str = CLIP_HUB_ID) -> ClipEmbedder:
    clip = from_pretrained(CLIPModel, source, "CLIP", default_id)
    tokenizer = from_pretrained(CLIPTokenizer, source, "CLIP's tokenizer", default_id)
    return ClipEmbedder(clip, tokenizer).to(device)


def load_pickscore(model: Source, processor: Source, device) -> ClipScoreReward:
    """PickScore v1: CLIP-H finetuned on Pick-a-Pic, with the laion CLIP-ViT-H-14 processor's settings."""
    clip = from_pretrained(CLIPModel, model, "PickScore", PICKSCORE_HUB_ID)
    settings = from_pretrained(CLIPProcessor, processor, "PickScore's processor", PICKSCORE_PROCESSOR_HUB_ID)
    embedder = ClipEmbedder(clip, settings.tokenizer, ImagePreprocess.from_processor(settings.image_processor))
    return ClipScoreReward(embedder.to(device), use_logit_scale=True)


def aesthetic_head_file(source: Source, cache_dir: str) -> Path:
    """A local copy of the aesthetic MLP: the given file, or a verified download into cache_dir."""
    hint = f"{source.hint()} (file sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor)"
    if "://" not in source.value:
        if not Path(source.value).is_file():
            raise MissingWeights(f"aesthetic head {source.value!r} not found: {hint}")
        return Path(source.value)
    target = Path(cache_dir) / Path(source.value).name
    if target.is_file():
        return target
    if offline():
        raise MissingWeights(f"aesthetic head not cached and HF_HUB_OFFLINE is set: {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(source.value, str(target) + ".part", progress=False)
    except (OSError, urllib.error.URLError) as err:
        raise MissingWeights(f"cannot download the aesthetic head ({err}): {hint}") from None
    if source.value == AESTHETIC_HEAD_URL:
        digest = hashlib.sha256(Path(str(target) + ".part").read_bytes()).hexdigest()
        if digest != AESTHETIC_HEAD_SHA256:
            raise MissingWeights(f"downloaded aesthetic head has sha256 {digest}, expected {AESTHETIC_HEAD_SHA256}")
    os.replace(str(target) + ".part", target)
    return target


# ----------------------------------------------------------------------------------------------
# HPSv2.1 (open_clip ViT-H-14)
# ----------------------------------------------------------------------------------------------


class HPSv2Reward(nn.Module):
    """HPSv2.1: r = cos(image, prompt) of open_clip ViT-H-14 finetuned on human preferences (HPDv2).

    HPSv2's own preprocessing (its `preprocess_val`): ToTensor, Resize(224, bicubic) on the tensor,
    CenterCrop(224), OpenAI's mean/std — what ImagePreprocess does. HPSv2 reports this cosine (often
    ×100 in its tables).
    """

    def __init__(self, model: nn.Module, tokenizer):  # an open_clip.CLIP and its tokenizer
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False).float(), tokenizer
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.preprocess = ImagePreprocess(size, size, CLIP_MEAN, CLIP_STD)  # = open_clip's OPENAI_DATASET_MEAN/STD
        self.text_embeds = PromptCache(
            lambda p: F.normalize(self.model.encode_text(self.tokenizer(p).to(module_device(self.model))), dim=-1))

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        image = F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)
        return (image * self.text_embeds(prompts)).sum(-1)


def load_hpsv2(source: Source, device) -> HPSv2Reward:
    """HPS_v2.1_compressed.pt (a {'state_dict': ...} of open_clip's CLIP) into open_clip's ViT-H-14.

    An open_clip_config.json beside the file ({"model_cfg": ...}, open_clip's hub format) names
    another architecture (the tiny build has one); otherwise ViT-H-14, as HPSv2's code uses.
    """
    import open_clip  # here, not at the top: it (with timm) adds seconds to every start of the script

    path = hub_file(source, HPSV2_FILE, "the HPSv2.1 checkpoint")
    arch_file = path.parent / "open_clip_config.json"
    arch = json.loads(arch_file.read_text())["model_cfg"] if arch_file.is_file() else open_clip.get_model_config(HPSV2_ARCH)
    model = load_strict(open_clip.model.CLIP(**arch), load_state(path, "HPSv2 checkpoint", source.trust_pickle), path, "HPSv2 (open_clip)")
    return HPSv2Reward(model, open_clip.get_tokenizer(HPSV2_ARCH, context_length=arch["text_cfg"]["context_length"])).to(device)


# ----------------------------------------------------------------------------------------------
# ImageReward v1.0 on transformers' BLIP classes
# ----------------------------------------------------------------------------------------------

# (the authors' checkpoint key, ours): "{i}" is a layer index; the rest of the key is kept. Theirs: BLIP's
# timm-style ViT (blip.visual_encoder), its BERT with cross-attention (blip.text_encoder, med.py — the
# same names as transformers' BlipTextModel) and the MLP head (mlp).
IMAGEREWARD_KEYS = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "vision.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.layers.", "head.layers."),
)
# Checkpoint entries the score does not use: BLIP's contrastive projections, and the text embeddings'
# position_ids buffer (an arange that BlipTextModel rebuilds).
IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def rename_key(key: str, pairs: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The first (source, target) prefix pair that matches `key`, applied; None if none matches."""
    for source, target in pairs:
        match = re.match(re.escape(source).replace(re.escape("{i}"), r"(\d+)"), key)
        if match:
            return (target.replace("{i}", match.group(1)) if match.groups() else target) + key[match.end():]
    return None


def imagereward_state_dict(checkpoint: Mapping[str, Tensor], path: Path) -> Dict[str, Tensor]:
    """The authors' ImageReward.pt → our ImageRewardNet's keys; an unknown key stops with one line."""
    state = {}
    for key, value in checkpoint.items():
        if key.startswith(IMAGEREWARD_UNUSED):
            continue
        ours = rename_key(key, IMAGEREWARD_KEYS)
        if ours is None:
            raise MissingWeights(f"{str(path)!r} is not an ImageReward v1.0 checkpoint (unexpected key {key!r})")
        state[ours] = value
    return state


def imagereward_configs(med_config: Mapping, vision: Mapping) -> Tuple[BlipVisionConfig, BlipTextConfig]:
    """transformers configs of ImageReward's towers: BLIP's ViT (LayerNorm eps 1e-6, exact GELU) and its
    med_config.json BERT, with cross-attention onto the ViT's tokens (encoder width = ViT width)."""
    vision_config = BlipVisionConfig(**vision, layer_norm_eps=1e-6, hidden_act="gelu")
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=vision["hidden_size"], intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], layer_norm_eps=med_config["layer_norm_eps"],
        hidden_act=med_config["hidden_act"], pad_token_id=med_config["pad_token_id"],
        bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
    )
    return vision_config, text_config


class ImageRewardNet(nn.Module):
    """ImageReward's network: BLIP ViT tokens → BERT text encoder of the prompt with cross-attention onto
    them → the MLP on the [CLS] state → standardised by the authors' mean and std."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # → (N,)
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state  # (N, 1 + patches, D_v), after the ViT's final norm
        # No encoder mask: every image token is attended, as the authors' all-ones image_atts.
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens)
        return (self.head(text.last_hidden_state[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageReward(nn.Module):
    """r(image, prompt) = ImageReward v1.0. Preprocessing as the authors' `_transform`: Resize(224,
    bicubic), CenterCrop(224), CLIP mean/std; the prompt tokenised to 35 tokens, padded."""

    def __init__(self, net: ImageRewardNet, tokenizer: BertTokenizer):
        super().__init__()
        self.net, self.tokenizer = net.eval().requires_grad_(False).float(), tokenizer
        size = net.vision.config.image_size
        self.preprocess = ImagePreprocess(size, size)
        self.tokens = PromptCache(self._tokenize)  # N prompts → (N, 2, 35): input ids and attention mask

    def _tokenize(self, prompts: List[str]) -> Tensor:
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                           return_tensors="pt")
        return torch.stack([t.input_ids, t.attention_mask], dim=1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokens(prompts).to(module_device(self.net))
        return self.net(self.preprocess(images), tokens[:, 0], tokens[:, 1])


def imagereward_tokenizer(source: Source) -> BertTokenizer:
    """bert-base-uncased plus BLIP's two tokens, as the authors' init_tokenizer (vocabulary 30524)."""
    tokenizer = from_pretrained(BertTokenizer, source, "ImageReward's BERT tokenizer", IMAGEREWARD_TOKENIZER_HUB_ID)
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):  # transformers 5 returns an empty one
        raise MissingWeights(f"cannot load ImageReward's BERT tokenizer {source.value!r} (no vocabulary found): "
                             f"{source.hint()} with a local folder, or download the hub id "
                             f"{IMAGEREWARD_TOKENIZER_HUB_ID!r} while online (HF_HUB_OFFLINE=1 forbids it)")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(model: Source, tokenizer: Source, device) -> ImageReward:
    """ImageReward.pt + med_config.json (a folder, or the hub id THUDM/ImageReward), and the tokenizer."""
    path = hub_file(model, IMAGEREWARD_FILE, "the ImageReward checkpoint")
    med_config = json.loads(hub_file(model, IMAGEREWARD_MED_CONFIG, "ImageReward's med_config.json").read_text())
    vision_file = path.parent / "vision_config.json"
    vision = json.loads(vision_file.read_text()) if vision_file.is_file() else IMAGEREWARD_VIT_L
    with quiet_library_logs():
        net = ImageRewardNet(*imagereward_configs(med_config, vision))
    state = imagereward_state_dict(load_state(path, "ImageReward checkpoint", model.trust_pickle), path)
    load_strict(net, state, path, "ImageReward v1.0")
    return ImageReward(net, imagereward_tokenizer(tokenizer)).to(device)


# ----------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------


def load_reward(name: str, sources: Mapping[str, Source], embedder: ClipEmbedder, cache_dir: str) -> nn.Module:
    """reward(images in [-1, 1] (N, 3, H, W), prompts (N,)) → r (N,), float32, on the embedder's device.

    sources: the Source of each weight by config name (aesthetic_head, hpsv2_checkpoint, pickscore_model,
    pickscore_processor, imagereward_model, imagereward_tokenizer); `embedder` is the CLIP ViT-L/14
    that aesthetic and clip-score score with.
    """
    device = module_device(embedder)
    if name == "aesthetic":
        source = sources["aesthetic_head"]
        head = AestheticHead.from_file(aesthetic_head_file(source, cache_dir), embedder.clip.config.projection_dim,
                                       source.trust_pickle)
        return AestheticReward(embedder, head.to(device))
    if name == "clip-score":
        return ClipScoreReward(embedder)
    if name == "hpsv2":
        return load_hpsv2(sources["hpsv2_checkpoint"], device)
    if name == "pickscore":
        return load_pickscore(sources["pickscore_model"], sources["pickscore_processor"], device)
    if name == "imagereward":
        return load_imagereward(sources["imagereward_model"], sources["imagereward_tokenizer"], device)
    raise ValueError(f"unknown reward {name!r} (one of {', '.join(REWARDS)})")
