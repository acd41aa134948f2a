"""Regenerate imagereward_reference.json: ImageReward's checkpoint keys and a tiny numerical oracle,
both computed by the authors' own code (the `image-reward` package, 1.5), not by ours.

The package does not import with transformers 5 (and pins timm 0.6); this script only swaps the imports
that are broken or need the network (fairscale's checkpoint wrapper, three moved transformers helpers,
the bert-base-uncased download, PreTrainedModel's new init), then uses the authors' modules unchanged:

    pip download --no-deps image-reward==1.5 -d /tmp/ir && cd /tmp/ir && unzip -q image_reward-1.5-*.whl
    python tests/data/make_imagereward_reference.py --package /tmp/ir > tests/data/imagereward_reference.json

Output: "checkpoint_keys" — name and shape of every entry of the state dict of the authors'
`ImageReward` module (what ImageReward.pt holds: it is that module's state_dict, loaded into it by
`ImageReward.load`); "tiny" — a tiny model of the same classes (config below), its weights filled by
the rule in `fill_weights` (which the test repeats), inputs and the scores the authors' forward gives.
"""

import argparse
import importlib
import json
import re
import sys
import types

import torch
from torch import nn

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128)
TINY_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 80, "encoder_width": 32,
            "add_cross_attention": True}
# ImageReward v1.0's med_config.json (BLIP's), as the authors' code reads it.
MED_V1 = {**TINY_MED, "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 512,
          "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 30524, "encoder_width": 768}


def fill_weights(shapes):
    """Deterministic weights for a list of (name, shape): 0.2·N(0, 1) in list order from seed 0, LayerNorm
    weights shifted by 1, position_ids = arange."""
    generator, state = torch.Generator().manual_seed(0), {}
    for name, shape in shapes:
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        value = 0.2 * torch.randn(shape, generator=generator)
        state[name] = value + 1 if re.search(r"(norm\d?|LayerNorm)\.weight$", name) else value
    return state


def import_authors_package(root):
    """The authors' modules, with the broken/network imports swapped (see the module docstring)."""
    checkpoint = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    checkpoint.checkpoint_wrapper = lambda module: module
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules[checkpoint.__name__] = checkpoint
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name, None))
    try:
        import transformers.file_utils  # noqa: F401
    except ImportError:
        file_utils = types.ModuleType("transformers.file_utils")
        file_utils.ModelOutput = transformers.utils.ModelOutput
        sys.modules["transformers.file_utils"] = file_utils
    modeling_utils.PreTrainedModel.init_weights = lambda self: None  # every weight is set below
    # Two helpers of transformers 4's ModuleUtilsMixin that med.py calls and transformers 5 removed, as 4 had them.
    modeling_utils.PreTrainedModel.get_head_mask = lambda self, head_mask, layers: [None] * layers

    def invert_attention_mask(self, mask):
        extended = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    modeling_utils.PreTrainedModel.invert_attention_mask = invert_attention_mask
    for name in ("ImageReward", "ImageReward.models", "ImageReward.models.BLIP"):  # skip __init__s (need clip)
        package = types.ModuleType(name)
        package.__path__ = [f"{root}/{name.replace('.', '/')}"]
        sys.modules[name] = package
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    blip.init_tokenizer = pretrain.init_tokenizer = lambda: None  # bert-base-uncased is not needed here
    return (importlib.import_module("ImageReward.ImageReward"), importlib.import_module("ImageReward.models.BLIP.med"),
            importlib.import_module("ImageReward.models.BLIP.vit"))


def write_med_config(path, values):
    with open(path, "w") as f:
        json.dump(values, f)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", required=True, help="folder holding the unpacked ImageReward/ package")
    parser.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    reward_module, med, vit = import_authors_package(args.package)

    full = reward_module.ImageReward(med_config=write_med_config(f"{args.tmp}/med_v1.json", MED_V1))
    checkpoint_keys = [[k, list(v.shape)] for k, v in full.state_dict().items()]
    del full

    # The same classes at tiny size: ImageReward's own __init__ hard-codes ViT-L and MLP(768), so the
    # tiny one is assembled from its parts (blip.visual_encoder, blip.text_encoder, the ITC projections, mlp).
    config = med.BertConfig.from_json_file(write_med_config(f"{args.tmp}/med_tiny.json", TINY_MED))
    tiny = nn.Module()
    tiny.blip = nn.Module()
    tiny.blip.visual_encoder = vit.VisionTransformer(
        img_size=TINY_VISION["image_size"], patch_size=TINY_VISION["patch_size"], embed_dim=TINY_VISION["hidden_size"],
        depth=TINY_VISION["num_hidden_layers"], num_heads=TINY_VISION["num_attention_heads"], mlp_ratio=4.0)
    tiny.blip.text_encoder = med.BertModel(config=config, add_pooling_layer=False)
    tiny.blip.vision_proj = nn.Linear(TINY_VISION["hidden_size"], 16)
    tiny.blip.text_proj = nn.Linear(TINY_MED["hidden_size"], 16)
    tiny.mlp = reward_module.MLP(TINY_MED["hidden_size"])
    shapes = [[k, list(v.shape)] for k, v in tiny.state_dict().items()]
    tiny.load_state_dict(fill_weights(shapes), strict=True)
    tiny.eval()

    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    input_ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 20, 3, 0, 0, 0, 0], [2, 30, 31, 32, 33, 34, 3]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():  # the body of the authors' ImageReward.score, on tensors
        image_embeds = tiny.blip.visual_encoder(pixel_values)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        text_output = tiny.blip.text_encoder(input_ids, attention_mask=attention_mask,
                                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                             return_dict=True)
        rewards = tiny.mlp(text_output.last_hidden_state[:, 0, :].float())
        rewards = (rewards - 0.16717362830052426) / 1.0333394966054072
    json.dump({
        "generated_by": "tests/data/make_imagereward_reference.py with image-reward 1.5 (the authors' package)",
        "med_config": MED_V1,
        "checkpoint_keys": checkpoint_keys,
        "tiny": {"vision": TINY_VISION, "med_config": TINY_MED, "keys": shapes, "pixel_seed": 1,
                 "pixel_shape": list(pixel_values.shape), "input_ids": input_ids.tolist(),
                 "scores": rewards.squeeze(-1).tolist()},
    }, sys.stdout, indent=None)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
