"""Tests of sd_rewards.py: every reward's tiny random build through the real loading code, the
preprocessing against each model's own processor, ImageReward's key map and numbers against the
authors' code (tests/data/imagereward_reference.json), and the one-line errors of missing weights.
CPU only, offline."""

import importlib.util
import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import CLIPImageProcessor

import cli
import sd_finetune as sd
import sd_rewards as sdr
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
AESTHETIC_ASSET = Path(os.environ.get("NABLA_GFN_AESTHETIC_HEAD", ""))  # the real sac+logos+ava1-l14-linearMSE.pth
PROMPT_DEPENDENT = ("hpsv2", "pickscore", "imagereward", "clip-score")
# The laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json that PickScore's authors load.
LAION_PROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "resample": 3, "size": 224}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def rewards(cache):
    """Every reward, loaded from its tiny build by the driver's own path (flags → Sources → sd_rewards)."""
    loaded = {}
    for name in sdr.REWARDS:
        cfg = sd.parse_config(["--preset", "smoke", "--reward", name, "--cache-dir", str(cache)])
        loaded[name] = sd.build_reward(cfg, sd.load_clip(cfg, torch.device("cpu")))
    return loaded


def reference():
    return json.loads((DATA / "imagereward_reference.json").read_text())


def authors_fill_weights():
    """The weight rule of the reference generator (tests/data/make_imagereward_reference.py)."""
    spec = importlib.util.spec_from_file_location("make_imagereward_reference", DATA / "make_imagereward_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fill_weights


# ----------------------------------------------------------------------------------------------
# Every reward: differentiable in the pixels, float32, each row scored with its own prompt
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sdr.REWARDS)
def test_reward_gradient_reaches_the_pixels_in_float32(name, rewards):
    images = (torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    r = rewards[name](images, ["cat", "dog"])
    (grad,) = torch.autograd.grad(r.sum(), images)
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.dtype == torch.float32 for p in rewards[name].parameters())


def test_hpsv2_normalises_with_open_clips_constants(rewards):
    preprocess = rewards["hpsv2"].preprocess
    assert preprocess.mean.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert preprocess.std.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert preprocess.size == preprocess.crop == rewards["hpsv2"].model.visual.image_size[0]


@pytest.mark.parametrize("name", sdr.REWARDS)
def test_each_row_is_scored_with_its_own_prompt(name, rewards):
    """Row i of a batch gets prompts[i]: batched = one by one = the batch reversed with its prompts."""
    reward = rewards[name]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["cat", "owl", "zebra"]
    with torch.no_grad():
        batched = reward(images, prompts)
        single = torch.cat([reward(images[i : i + 1], [p]) for i, p in enumerate(prompts)])
        reversed_ = reward(images.flip(0), prompts[::-1]).flip(0)
        other_prompt = reward(images, ["frog"] * 3)
    # float32 reward models in other batch shapes and row orders (other kernels): a few eps32 of the scores' terms.
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, reversed_, rtol=1e-4, atol=1e-5)
    if name in PROMPT_DEPENDENT:
        assert (batched - other_prompt).abs().max() > 1e-6
    else:  # the aesthetic score ignores the prompt
        torch.testing.assert_close(batched, other_prompt)


# ----------------------------------------------------------------------------------------------
# Preprocessing: plain torch against the models' own processors (not differentiable: PIL / uint8)
# ----------------------------------------------------------------------------------------------


def sample_image(kind, shape):
    generator = torch.Generator().manual_seed(2)
    if kind == "noise":
        x = torch.rand(1, 3, *shape, generator=generator)
    else:
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 10, generator=generator), size=shape, mode="bicubic")
    u8 = (x[0].clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).numpy()), u8[None].float() / 127.5 - 1  # PIL, and ours in [-1, 1]


def own_processors():
    """Each reward's preprocessing as its authors run it (on PIL images), by name."""
    hps_val = T.Compose([T.ToTensor(), T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                         T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])  # HPSv2's preprocess_val
    # ImageReward's _transform(224), which is also OpenAI CLIP's own preprocess (clip.load) at 224
    clip_224 = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize(sdr.CLIP_MEAN, sdr.CLIP_STD)])
    laion = CLIPImageProcessor(**LAION_PROCESSOR)
    hf = lambda processor: lambda pil: torch.as_tensor(processor(pil, return_tensors="pt").pixel_values[0])
    return {"aesthetic / clip-score": (clip_224, sdr.ImagePreprocess(224, 224)),
            "pickscore": (hf(laion), sdr.ImagePreprocess.from_processor(laion)),
            "hpsv2": (hps_val, sdr.ImagePreprocess(224, 224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)),
            "imagereward": (clip_224, sdr.ImagePreprocess(224, 224)),
            "open_clip ViT-H-14": (open_clip.image_transform(224, is_train=False), sdr.ImagePreprocess(224, 224))}


@pytest.mark.parametrize("shape", [(300, 260), (250, 330)])
@pytest.mark.parametrize("name", list(own_processors()))
def test_preprocessing_matches_the_models_own_processor(name, shape):
    """Equal up to PIL's uint8 rounding after the resize (≤ 1.5 grey levels on a smooth image; a small
    mean on noise, where a wrong filter or crop is ~25× larger — see the broken copies below)."""
    own, ours = own_processors()[name]
    for kind, max_tol, mean_tol in (("smooth", 1.5 / 255 / 0.26, 0.006), ("noise", None, 0.01)):
        pil, x = sample_image(kind, shape)
        expected, got = own(pil), ours(x)[0]
        assert got.shape == expected.shape == (3, 224, 224)
        error = (got - expected).abs()
        assert error.mean() <= mean_tol, (kind, float(error.mean()))
        if max_tol is not None:
            assert error.max() <= max_tol, (kind, float(error.max()))


@pytest.mark.parametrize("broken", ["bilinear", "crop off by 2", "no antialias"])
def test_preprocessing_check_catches_broken_copies(broken):
    own, ours = own_processors()["aesthetic / clip-score"]
    pil, x = sample_image("noise", (300, 260))
    unit = (x + 1) / 2
    size = (int(224 * 300 / 260), 224)
    mode = "bilinear" if broken == "bilinear" else "bicubic"
    resized = torch.nn.functional.interpolate(unit, size=size, mode=mode, antialias=broken != "no antialias")
    top = (size[0] - 224) // 2 + (2 if broken == "crop off by 2" else 0)
    got = (resized[..., top : top + 224, :] - ours.mean) / ours.std
    assert (got[0] - own(pil)).abs().mean() > 0.05


def test_pickscore_preprocessing_reads_its_processor(cache):
    """The tiny PickScore build's processor (32², bicubic, centre crop) drives the reward's preprocessing."""
    cfg = sd.parse_config(["--preset", "smoke", "--reward", "pickscore", "--cache-dir", str(cache)])
    reward = sd.build_reward(cfg, sd.load_clip(cfg, torch.device("cpu")))
    processor = CLIPImageProcessor.from_pretrained(sd.weight_source(cfg, "pickscore_processor").value)
    pil, x = sample_image("smooth", (48, 40))
    expected = torch.as_tensor(processor(pil, return_tensors="pt").pixel_values[0])
    got = reward.embedder.preprocess(x)[0]
    assert got.shape == expected.shape == (3, 32, 32) and (got - expected).abs().mean() < 0.01


# ----------------------------------------------------------------------------------------------
# ImageReward: the key map and the numbers of the authors' code
# ----------------------------------------------------------------------------------------------


def test_imagereward_key_map_covers_every_checkpoint_key():
    """All 625 entries of the authors' ImageReward state dict (ImageReward.pt) either map onto a weight
    of our full-size model with the same shape — each weight exactly once — or are the 5 unused ones."""
    ref = reference()
    with torch.device("meta"):
        net = sdr.ImageRewardNet(*sdr.imagereward_configs(ref["med_config"], sdr.IMAGEREWARD_VIT_L))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in ref["checkpoint_keys"]}
    assert len(checkpoint) == 625
    mapped = sdr.imagereward_state_dict(checkpoint, Path("ImageReward.pt"))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    unused = [k for k in checkpoint if k.startswith(sdr.IMAGEREWARD_UNUSED)]
    assert sorted(unused) == sorted(["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                                     "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"])
    assert len(mapped) + len(unused) == len(checkpoint)


@pytest.mark.parametrize("dropped", [3, 5, 9])  # qkv, attn.proj, the ViT's final norm
def test_imagereward_key_map_without_an_entry_fails_in_one_line(dropped, monkeypatch):
    ref = reference()
    monkeypatch.setattr(sdr, "IMAGEREWARD_KEYS", sdr.IMAGEREWARD_KEYS[:dropped] + sdr.IMAGEREWARD_KEYS[dropped + 1:])
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in ref["checkpoint_keys"]}
    with pytest.raises(sdr.MissingWeights, match="unexpected key"):
        sdr.imagereward_state_dict(checkpoint, Path("ImageReward.pt"))


def test_imagereward_gives_the_authors_scores_on_a_tiny_model():
    """Our transformers-based ImageReward, loaded from a tiny checkpoint in the authors' key layout,
    reproduces the scores that the authors' own modules (image-reward 1.5) gave for it."""
    tiny = reference()["tiny"]
    checkpoint = authors_fill_weights()(tiny["keys"])
    net = sdr.ImageRewardNet(*sdr.imagereward_configs(tiny["med_config"], tiny["vision"]))
    sdr.load_strict(net, sdr.imagereward_state_dict(checkpoint, Path("tiny.pt")), Path("tiny.pt"), "ImageReward")
    pixel_values = torch.randn(*tiny["pixel_shape"], generator=torch.Generator().manual_seed(tiny["pixel_seed"]))
    input_ids = torch.tensor(tiny["input_ids"])
    with torch.no_grad():
        scores = net.eval()(pixel_values, input_ids, (input_ids != 0).long())
    # float32, another implementation on another machine; the 0.4 score is a difference of terms of size ~30 (as the
    # −29 one shows), so atol ≈ 30·eps32 × 30 (seen 2.6e-5); one 1% weight change below moves scores by > 1e-3.
    torch.testing.assert_close(scores, torch.tensor(tiny["scores"]), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the check can fail: the padding mask matters, and so does each weight
        assert (net(pixel_values, input_ids, torch.ones_like(input_ids)) - scores).abs().max() > 1e-3
        net.text.encoder.layer[0].crossattention.self.key.weight.mul_(1.01)
        assert (net(pixel_values, input_ids, (input_ids != 0).long()) - scores).abs().max() > 1e-3


def test_imagereward_tokenizer_is_the_authors(cache):
    """BERT WordPiece plus BLIP's [DEC] and [ENC] (vocabulary + 2), prompts padded to 35 tokens."""
    folder = tiny_models.tiny_reward_assets(str(cache), "imagereward")
    tokenizer = sdr.imagereward_tokenizer(sdr.Source(str(folder / "tokenizer"), "--t", "T"))
    base = sdr.BertTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == len(base) + 2 and tokenizer.bos_token == "[DEC]"
    assert "[ENC]" in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    reward = sdr.load_imagereward(sdr.Source(str(folder), "--m", "M"), sdr.Source(str(folder / "tokenizer"), "--t", "T"),
                                  "cpu")
    tokens = reward.tokens(["a cat", "cat"])
    assert tokens.shape == (2, 2, sdr.IMAGEREWARD_MAX_TOKENS)
    assert tokens[0, 0].tolist() == tokenizer("a cat", padding="max_length", max_length=35).input_ids


# ----------------------------------------------------------------------------------------------
# Real weights where they exist here; one-line errors where they do not
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not AESTHETIC_ASSET.is_file(), reason="the real aesthetic MLP: set NABLA_GFN_AESTHETIC_HEAD to a "
                    "local sac+logos+ava1-l14-linearMSE.pth")
def test_aesthetic_head_loads_the_real_file_with_strict_keys():
    head = sdr.AestheticHead.from_file(AESTHETIC_ASSET, embed_dim=768)
    state = torch.load(AESTHETIC_ASSET, map_location="cpu", weights_only=True)
    assert set(state) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    embeds = torch.nn.functional.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    scores = head(embeds)
    assert scores.shape == (5,) and torch.all((scores > 0) & (scores < 10))  # the predictor's 1–10 scale


def test_help_lists_every_reward_and_preset():
    help_text = " ".join(cli.build_parser(sd.Config, sd.PROG).format_help().split())  # what `python sd_finetune.py --help` prints
    assert "--reward {aesthetic,hpsv2,pickscore,imagereward,clip-score}" in help_text
    assert "--preset {paper,aesthetic,hpsv2,imagereward,sd3,smoke}" in help_text


@pytest.mark.parametrize("reward, flag, env, hub_id", [
    ("hpsv2", "--hpsv2-checkpoint", "NABLA_GFN_HPSV2", sdr.HPSV2_HUB_ID),
    ("pickscore", "--pickscore-model", "NABLA_GFN_PICKSCORE", sdr.PICKSCORE_HUB_ID),
    ("pickscore", "--pickscore-processor", "NABLA_GFN_PICKSCORE_PROCESSOR", sdr.PICKSCORE_PROCESSOR_HUB_ID),
    ("imagereward", "--imagereward-model", "NABLA_GFN_IMAGEREWARD", sdr.IMAGEREWARD_HUB_ID),
    ("imagereward", "--imagereward-tokenizer", "NABLA_GFN_IMAGEREWARD_TOKENIZER", sdr.IMAGEREWARD_TOKENIZER_HUB_ID),
])
@pytest.mark.parametrize("where", ["missing folder", "hub id offline"])
def test_missing_reward_weights_give_one_line_naming_the_remedy(reward, flag, env, hub_id, where, cache, tmp_path,
                                                                capsys):
    # A hub id that no cache holds (the defaults, e.g. bert-base-uncased, may be cached on a machine).
    value = "/no/such/folder" if where == "missing folder" else f"nabla-gfn-tests/no-such-{hub_id.split('/')[-1]}"
    with pytest.raises(SystemExit) as exit_:
        sd.main(["--preset", "smoke", "--reward", reward, "--cache-dir", str(cache), "--out", str(tmp_path / "run"),
                 flag, value])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(part in err[0] for part in (value, flag, env)), err


def test_a_checkpoint_of_another_model_gives_one_line(cache, tmp_path):
    """An HPSv2 file that does not fit ViT-H-14 / the tiny architecture stops with the file named."""
    folder = tmp_path / "hps"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_models.tiny_reward_assets(str(cache), "hpsv2") / "open_clip_config.json")
                                                  .read_text())
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}}, folder / sdr.HPSV2_FILE)
    with pytest.raises(sdr.MissingWeights, match="is not a HPSv2"):
        sdr.load_hpsv2(sdr.Source(str(folder), "--hpsv2-checkpoint", "NABLA_GFN_HPSV2"), "cpu")
