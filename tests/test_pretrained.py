"""Loading pretrained SD checkpoints offline: family detection, diffusers folders, single files, pickle, errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from safetensors.torch import save_file
from sd_fixtures import BUILDERS, config_only, save_tiny, text_encoders, tiny_tokenizer

from lowvram.errors import ModelLoadError
from lowvram.models import clip_vocab as V
from lowvram.models import pretrained as P
from lowvram.models.pretrained import detect_family, load_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    return {fam: save_tiny(tmp, fam) for fam in ("sd1", "sd2", "sdxl")}, tmp


def _same_weights(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return [k for k in sa if not torch.equal(sa[k].float(), sb[k].float())]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family_from_folder_and_single_file(saved, family):
    paths, _ = saved
    assert detect_family(paths[family]["folder"]) == family
    assert detect_family(paths[family]["file"]) == family


def test_v_prediction_from_scheduler_sidecar_yaml_or_argument(saved, tmp_path):
    paths, _ = saved
    folder = paths["sd2"]["folder"]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    vfolder = tmp_path / "sd2v"
    import shutil

    shutil.copytree(folder, vfolder)
    (vfolder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(sched, prediction_type="v_prediction")))
    assert detect_family(vfolder) == "sd2-v"
    single = tmp_path / "m.safetensors"
    shutil.copy(paths["sd2"]["file"], single)
    assert detect_family(single) == "sd2"  # not recorded in the file
    assert detect_family(single, prediction="v_prediction") == "sd2-v"
    single.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert detect_family(single) == "sd2-v"
    comps = load_pretrained(vfolder)
    assert comps.family == "sd2-v" and comps.prediction_type == "v_prediction"
    assert comps.training_scheduler().config.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_the_same_weights_as_the_folder(saved, family):
    paths, _ = saved
    folder = load_pretrained(paths[family]["folder"])
    single = load_pretrained(paths[family]["file"], config=paths[family]["folder"], tokenizer=paths[family]["folder"])
    assert folder.family == single.family == family
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name), getattr(single, name)
        assert (a is None) == (b is None) == (name == "text_encoder_2" and family != "sdxl")
        if a is not None:
            assert _same_weights(a, b) == [], name
    ids = folder.tokenizer("a photo of sks cat").input_ids
    assert single.tokenizer("a photo of sks cat").input_ids == ids
    if family == "sdxl":
        assert single.tokenizer_2.pad_token == "!" and folder.tokenizer_2.pad_token == "!"
    assert not any(p.requires_grad for p in single.unet.parameters())
    if family.startswith("sd2"):
        assert single.unet.config.upcast_attention and folder.unet.config.upcast_attention


def test_frozen_dtype_and_sdxl_vae_kept_fp32(saved):
    paths, _ = saved
    xl = load_pretrained(paths["sdxl"]["folder"], dtype="fp16")
    assert xl.unet.dtype == torch.float16 and xl.text_encoder_2.dtype == torch.float16
    assert xl.vae.dtype == torch.float32 and xl.notes  # force_upcast VAE: fp16 overflows
    sd1 = load_pretrained(paths["sd1"]["file"], dtype="bf16", config=paths["sd1"]["folder"], tokenizer=paths["sd1"]["folder"])
    assert sd1.unet.dtype == sd1.vae.dtype == sd1.text_encoder.dtype == torch.bfloat16


def test_single_file_whose_text_encoder_does_not_fit_clip_names_the_fix(saved):
    """The tiny fixtures' 16-token vocabularies are not CLIP's: without model.tokenizer that must fail clearly."""
    paths, tmp = saved
    with pytest.raises(ModelLoadError, match="model.config"):
        load_pretrained(paths["sd1"]["file"], config=paths["sd1"]["folder"].parent / "nonexistent_cfg")
    cfg_only = config_only(paths["sd1"]["folder"], tmp / "cfg_only")
    with pytest.raises(ModelLoadError, match="model.tokenizer") as e:
        load_pretrained(paths["sd1"]["file"], config=cfg_only)
    assert "49408 tokens" in str(e.value)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_alone_gets_clip_tokenizers_and_the_folders_embeddings(tmp_path, family):
    """A single file with CLIP-sized text encoders loads with no tokenizer given (model.config only describes the
    tiny layout: real checkpoints use the shipped configs), with the hub's pad conventions."""
    paths = save_tiny(tmp_path, family, clip_vocab=True)
    folder = load_pretrained(paths["folder"])
    single = load_pretrained(paths["file"], config=config_only(paths["folder"], tmp_path / "cfg"))
    pipes = {"folder": folder.pipeline(), "single": single.pipeline()}
    for name in ("tokenizer", "tokenizer_2"):
        a, b = getattr(folder, name), getattr(single, name)
        if a is None:
            continue
        assert len(b) == 49408 and b.model_max_length == 77 and b.pad_token == a.pad_token
        assert b.pad_token == ("!" if family == "sd2" or name == "tokenizer_2" else "<|endoftext|>")
    prompt = "a photo of sks dog, Café 東京 🐱 " * 8  # long: truncated at 77 tokens
    kw = {"device": "cpu", "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    emb = {k: p.encode_prompt(prompt, **kw) for k, p in pipes.items()}
    for a, b in zip(emb["folder"], emb["single"], strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_clip_vocab_derivation_from_a_bpe_file(tmp_path):
    """open_clip's bpe_simple_vocab_16e6.txt.gz layout → vocab.json/merges.txt with the same ids as CLIP's."""
    tok = tiny_tokenizer(tmp_path / "ref")
    merges = (tmp_path / "ref" / "merges.txt").read_text().splitlines()[1:]
    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:  # the file's first line is a header, as in CLIP's
        f.write("\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2", *merges]) + "\n")
    out = V.write_clip_vocab(tmp_path / "derived", bpe)
    assert json.loads((out / "vocab.json").read_text()) == tok.get_vocab()
    assert (out / "merges.txt").read_text().splitlines()[1:] == merges


def test_pickled_checkpoint_refused_without_opt_in(saved, tmp_path):
    paths, _ = saved
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(paths["sd1"]["file"]))}, ckpt)
    with pytest.raises(ModelLoadError, match="allow_pickle") as e:
        load_pretrained(ckpt, config=paths["sd1"]["folder"], tokenizer=paths["sd1"]["folder"])
    assert "--allow-pickle" in str(e.value)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        detect_family(ckpt)
    comps = load_pretrained(ckpt, allow_pickle=True, config=paths["sd1"]["folder"], tokenizer=paths["sd1"]["folder"])
    ref = load_pretrained(paths["sd1"]["folder"])
    assert comps.family == "sd1" and _same_weights(comps.unet, ref.unet) == []


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, bad)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_pretrained(bad, allow_pickle=True)


def test_unknown_files_and_folders_give_clear_errors(saved, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({f"encoder.layer.{i}.weight": torch.zeros(2) for i in range(5)}, str(other))
    with pytest.raises(ModelLoadError, match=r"found 5 tensors, none of the known prefixes \(model\.diffusion_model\."):
        detect_family(other)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(unet_only))
    with pytest.raises(ModelLoadError, match="no text encoder"):
        load_pretrained(unet_only)
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.positional_embedding": torch.zeros(2)}, str(refiner))
    with pytest.raises(ModelLoadError, match="refiner"):
        detect_family(refiner)
    folder = tmp_path / "not_sd"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="without unet/config.json"):
        load_pretrained(folder)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="unknown model family"):
        load_pretrained(folder, family="sd3")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable"):
        detect_family(garbage)


def test_wrong_family_for_a_single_file_is_a_clear_error(saved):
    paths, _ = saved
    with pytest.raises(ModelLoadError, match="does not match|model.family"):
        load_pretrained(paths["sd1"]["file"], family="sdxl", tokenizer=paths["sd1"]["folder"])


@pytest.mark.parametrize(
    ("family", "counts"),
    [
        # parameter counts of the public SD 1.5 / 2.1 / SDXL base models
        ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd2", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
        ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840}),
    ],
)
def test_shipped_single_file_configs_have_the_real_sizes(family, counts):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = P.CONFIGS_DIR / family
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")),
        }
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()} == counts
    assert P._family_of_folder(cfg) == family


def test_builders_cover_every_family():
    assert set(BUILDERS) | {"sd2-v"} == set(P.FAMILIES)
    assert text_encoders  # re-exported helper used by other test files
