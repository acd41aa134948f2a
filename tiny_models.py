"""Tiny random builds of every model sd_finetune.py loads, for smoke tests and CPU benchmarks.

`--model tiny` (and `--preset smoke`) make sd_finetune.py load these instead of the real weights: a
Stable Diffusion pipeline with SD's component classes and scheduler config (`--model tiny-sd3`: an SD3
pipeline with SD3.5-Medium's component classes and scheduler config), a CLIP, the LAION aesthetic
head, HPSv2's open_clip model, PickScore and ImageReward, each at toy size and random, saved in its real
format and loaded by the same functions as the real weights (sd_rewards.py). Nothing is downloaded.
Each build is made once under the cache folder (`build_once`), seeded, so every process and run sees the
same weights. Production code imports this module only when a 'tiny' weight is asked for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                          CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from sd_rewards import (HPSV2_FILE, IMAGEREWARD_FILE, IMAGEREWARD_KEYS, IMAGEREWARD_MED_CONFIG, AestheticHead,
                        ImageRewardNet, imagereward_configs, quiet_library_logs, rename_key)
from toy_2d import sd_scheduler  # SD v1's noise schedule, defined once


def build_once(root: Path, build: Callable[[Path], None], seed: int = 0) -> Path:
    """Run build(folder) once into a staging folder (seeded, global RNG untouched), then rename it to
    root: concurrent processes never see a half-built folder."""
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-"))
    with torch.random.fork_rng(devices=[]), quiet_library_logs():
        torch.manual_seed(seed)
        build(staging)
    try:
        staging.rename(root)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _byte_symbols() -> List[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP convention)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, extra = [], 0
    for b in range(256):
        symbols.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return symbols


def build_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character), built
    from vocab.json/merges.txt written here: no download. Same class and special tokens as SD's."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style unigram over letters and digits, '▁' marking a word start, </s>
    appended), built with the tokenizers library and saved as tokenizer.json: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in chars),
             *(("▁" + c, -1.5) for c in chars)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_clip_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_clip(vocab_size: int, image_size: int = 32) -> CLIPModel:
    return CLIPModel(CLIPConfig(
        text_config=tiny_clip_text_config(vocab_size).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    ))


def build_tiny_bert_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT WordPiece tokenizer over letters and digits (vocab.txt written here), like bert-base-uncased
    before BLIP adds its two tokens; [PAD] = 0 as in ImageReward's med_config."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *".,-'"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def _build_tiny_hpsv2(folder: Path) -> None:
    """open_clip's CLIP at toy size (the real tokenizer's 49408-token vocabulary and 77-token context)."""
    import open_clip

    arch = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch}))
    torch.save({"state_dict": open_clip.model.CLIP(**arch).state_dict()}, folder / HPSV2_FILE)


def _build_tiny_pickscore(folder: Path) -> None:
    """A tiny CLIPModel and a CLIPProcessor of the laion processor's kind (bicubic, centre crop), one folder."""
    tokenizer = build_tiny_tokenizer(folder / "vocab")
    tiny_clip(len(tokenizer)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


TINY_IMAGEREWARD_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128)


def _build_tiny_imagereward(folder: Path) -> None:
    """A tiny ImageRewardNet, saved in the authors' format: ImageReward.pt with *their* key names (our
    map inverted, plus the unused entries), med_config.json, vision_config.json, tokenizer/."""
    tokenizer = build_tiny_bert_tokenizer(folder / "tokenizer")
    med_config = dict(vocab_size=len(tokenizer) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu",
                      pad_token_id=0, add_cross_attention=True, encoder_width=32, model_type="bert")
    net = ImageRewardNet(*imagereward_configs(med_config, TINY_IMAGEREWARD_VISION))
    with torch.no_grad():  # larger than transformers' init (std 0.02), so that the tiny score varies visibly
        for name, p in net.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name.lower() and name.endswith("weight") else 0.2 * torch.randn_like(p))
    inverse = [(ours, theirs) for theirs, ours in IMAGEREWARD_KEYS]
    state = {rename_key(k, inverse): v for k, v in net.state_dict().items()}
    width, text_width = TINY_IMAGEREWARD_VISION["hidden_size"], med_config["hidden_size"]
    state.update({"blip.vision_proj.weight": torch.randn(16, width), "blip.vision_proj.bias": torch.zeros(16),
                  "blip.text_proj.weight": torch.randn(16, text_width), "blip.text_proj.bias": torch.zeros(16),
                  "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None]})
    torch.save(state, folder / IMAGEREWARD_FILE)
    (folder / IMAGEREWARD_MED_CONFIG).write_text(json.dumps(med_config))
    (folder / "vision_config.json").write_text(json.dumps(TINY_IMAGEREWARD_VISION))


TINY_BUILDERS = {"hpsv2": _build_tiny_hpsv2, "pickscore": _build_tiny_pickscore, "imagereward": _build_tiny_imagereward}


def tiny_reward_assets(cache_dir: str, name: str) -> Path:
    """The folder of reward `name`'s tiny random build (made once under cache_dir/tiny-rewards-v1/)."""
    return build_once(Path(cache_dir) / "tiny-rewards-v1" / name, TINY_BUILDERS[name])


# ----------------------------------------------------------------------------------------------
# The tiny SD pipeline (with its CLIP and aesthetic head), and where each 'tiny' weight lives
# ----------------------------------------------------------------------------------------------


def tiny_assets(cache_dir: str) -> Path:
    """Build once (under cache_dir/tiny-v1) and return: a tiny random SD pipeline with SD's component
    classes and scheduler config, a tiny random CLIP and a random aesthetic head."""
    return build_once(Path(cache_dir) / "tiny-v1", _build_tiny_pipeline)


def _build_tiny_pipeline(folder: Path) -> None:
    tokenizer = build_tiny_tokenizer(folder / "vocab")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          sample_size=32, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(tiny_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(sample_size=4, block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                  attention_head_dim=4),
        scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline")
    clip = tiny_clip(len(tokenizer))
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    torch.save(AestheticHead(clip.config.projection_dim).state_dict(), folder / "aesthetic_head.pth")


def tiny_sd3_assets(cache_dir: str) -> Path:
    """Build once (under cache_dir/tiny-sd3-v1) and return a tiny random SD3 pipeline (`_build_tiny_sd3_pipeline`)."""
    return build_once(Path(cache_dir) / "tiny-sd3-v1", _build_tiny_sd3_pipeline)


def _build_tiny_sd3_pipeline(folder: Path) -> None:
    """SD3.5-Medium's classes at toy size: an MMDiT with its dual attention (first block) and RMS QK-norm,
    two CLIP text encoders with projection, a T5 encoder, a 16-channel VAE with SD3's scaling and shift,
    and FlowMatchEulerDiscreteScheduler with SD3's shift 3. Its tokens are 64 wide (the pipeline pads the two
    32-wide CLIP states to the T5 width), its pooled embedding 2 × 32; positions for images up to 1024²."""
    tokenizer = build_tiny_tokenizer(folder / "vocab")
    clip_config = tiny_clip_text_config(len(tokenizer))
    clip_config.projection_dim = 32
    t5_tokenizer = build_tiny_t5_tokenizer(folder / "t5")
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                          caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64,
                                          dual_attention_layers=(0,), qk_norm="rms_norm"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          sample_size=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(clip_config), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config), tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=2)),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder / "pipeline")


# Config field of sd_finetune.py → the local folder or file of its tiny build (the eval stand-ins of
# --dreamsim / --fid-weights are not builds: sd_metrics.py makes them when it reads 'tiny').
TINY_WEIGHTS = {
    "model": lambda cache: tiny_assets(cache) / "pipeline",
    "model_sd3": lambda cache: tiny_sd3_assets(cache) / "pipeline",  # --model tiny-sd3
    "clip_model": lambda cache: tiny_assets(cache) / "clip",
    "aesthetic_head": lambda cache: tiny_assets(cache) / "aesthetic_head.pth",
    "hpsv2_checkpoint": lambda cache: tiny_reward_assets(cache, "hpsv2"),
    "pickscore_model": lambda cache: tiny_reward_assets(cache, "pickscore"),
    "pickscore_processor": lambda cache: tiny_reward_assets(cache, "pickscore"),
    "imagereward_model": lambda cache: tiny_reward_assets(cache, "imagereward"),
    "imagereward_tokenizer": lambda cache: tiny_reward_assets(cache, "imagereward") / "tokenizer",
}
