"""LoRA at scale, on the tiny random-weight model: the full-size SD 1.5 architecture's shapes (meta device),
offset noise, gradient checkpointing, cached latents
and text embeddings (equal to fresh encodes, invalidated on change), frozen bf16 parts, AdamW variants, and kohya-format
adapters (exact round trip, identical generate() output)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from atelier.data.captioned_folder import (
    CaptionedFolderDataModule,
)
from atelier.models.sd_lora import StableDiffusionLoRA, adamw_variant, frozen_dtype, lora_parameter_count, offset_noise
from atelier.text2image.kohya import (
    diffusers_to_kohya,
    is_kohya,
    kohya_to_diffusers,
    kohya_to_module_name,
    module_to_kohya,
    read_lora,
)
from atelier.text2image.latent_cache import LatentCache
from atelier.text2image.sd15 import PARAMETERS, build_components, parameter_counts, sd15_tokenizer
from atelier.text2image.weights import is_random_weights, resolve_model
from tests import sd_fixtures
from tests.conftest import compose_cfg, load_script

tiny_sd = sd_fixtures.tiny_sd
caption_dir = sd_fixtures.caption_dir
bucket_dir = sd_fixtures.bucket_dir

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2)


def make_module(tiny_sd: Path, seed: int = 0, **kwargs: object) -> StableDiffusionLoRA:
    torch.manual_seed(seed)  # the LoRA matrices' init
    options = {"rank": 4, "alpha": 4.0, "validation_prompts": [], "num_inference_steps": 2, "sampler": "ddim",
               **kwargs}
    return StableDiffusionLoRA(str(tiny_sd), ADAMW, **options)


def make_data(root: Path, **kwargs: object) -> CaptionedFolderDataModule:
    options = {"image_size": 32, "batch_size": 2, "val_fraction": 0.0, "instance_prompt": "a painting by {label}",
               "check_images": False, **kwargs}
    return CaptionedFolderDataModule(str(root), **options)


def fit(module: L.LightningModule, data: L.LightningDataModule, root: Path, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        num_sanity_val_steps=0, limit_val_batches=0, precision="32-true")
    trainer.fit(module, datamodule=data)
    return trainer


# ---------------------------------------------------------------- the full-size architecture (meta device)
def test_sd15_random_has_the_published_component_sizes(tmp_path: Path) -> None:
    assert parameter_counts() == PARAMETERS  # UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M
    model_dir = resolve_model("sd15_random", tmp_path / "tiny_sd")
    assert model_dir == tmp_path / "sd15_random" and is_random_weights(model_dir)
    assert not list(model_dir.rglob("*.safetensors"))  # configs only: the weights are drawn when built
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    text = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (768, 12, 49408)

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))  # vocab.json + merges.txt
    assert (model_dir / "tokenizer" / "vocab.json").is_file() and (model_dir / "tokenizer" / "merges.txt").is_file()
    ids = tokenizer(["an impressionist painting, 1872 — Monet"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids.max()) < 49408
    assert ids[0, 0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids[0].tolist()
    assert ids[0].tolist() == sd15_tokenizer()(["an impressionist painting, 1872 — Monet"], padding="max_length",
                                               max_length=77).input_ids[0]
    assert len(tokenizer("impressionist").input_ids) < len("impressionist")  # the letter-pair merges apply


def test_lora_parameter_counts_on_sd15() -> None:
    unet = build_components("meta")["unet"]
    counts = {r: lora_parameter_count(unet, r) for r in (4, 16, 64)}
    assert counts[4] == 797_184  # SD 1.5 attention LoRA (to_q/k/v/out.0), rank 4
    assert counts[16] == 4 * counts[4] and counts[64] == 16 * counts[4]


def test_kohya_names_map_back_to_every_sd15_module() -> None:
    names = [n for n, m in build_components("meta")["unet"].named_modules()
             if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(names) > 250
    for name in names:
        kohya = module_to_kohya(name)
        assert "." not in kohya and kohya.startswith("lora_unet_")
        assert kohya_to_module_name(kohya) == name  # the name table, no UNet needed
        assert kohya_to_module_name(kohya, names) == name
    assert module_to_kohya("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


# ---------------------------------------------------------------- buckets
def test_noise_offset_shifts_each_channel_mean() -> None:
    shape = (64, 4, 16, 16)
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(0))
    shifted = offset_noise(shape, 0.1, torch.Generator().manual_seed(0))
    diff = shifted - plain  # the offset alone: constant over each image's channel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=generator)
    torch.testing.assert_close(diff[:, :, :1, :1], 0.1 * torch.randn((64, 4, 1, 1), generator=generator))
    # per-channel means: variance 1/(h·w) without the offset, 1/(h·w) + offset² with it
    big = (2000, 4, 16, 16)
    std_plain = offset_noise(big, 0.0, torch.Generator().manual_seed(1)).mean(dim=(2, 3)).std()
    std_offset = offset_noise(big, 0.1, torch.Generator().manual_seed(1)).mean(dim=(2, 3)).std()
    assert abs(float(std_plain) - 1 / 16) < 0.005
    assert abs(float(std_offset) - math.sqrt(1 / 256 + 0.01)) < 0.006


def test_module_noise_offset_changes_the_loss_only_through_the_noise(tiny_sd: Path) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = make_module(tiny_sd).per_sample_loss(images, ["a", "b"], torch.Generator().manual_seed(0))
    offset = make_module(tiny_sd, noise_offset=0.5).per_sample_loss(images, ["a", "b"],
                                                                    torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, offset)
    with pytest.raises(ValueError, match="noise_offset"):
        make_module(tiny_sd, noise_offset=-1.0)


# ---------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_sd: Path) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    results = []
    for checkpointing in (False, True):
        module = make_module(tiny_sd, gradient_checkpointing=checkpointing, lora_dropout=0.0)
        module.train()
        assert module.unet.is_gradient_checkpointing is checkpointing
        with torch.no_grad():  # non-zero B, so that every LoRA matrix gets a gradient
            for p in module.lora_parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        loss = module.per_sample_loss(images, ["a harbour", "a river"], torch.Generator().manual_seed(0)).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if n in module.trainable_names}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert all(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- cached latents and text embeddings
def test_cached_latents_equal_fresh_encodes_and_are_invalidated(tiny_sd: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / f"{i}.png")
    module = make_module(tiny_sd)
    options = {"cache_latents": True, "cache_text_embeddings": True, "latent_cache_dir": str(tmp_path / "cache"),
               "hflip": True, "instance_prompt": "a painting"}
    data = make_data(root, **options)
    data.setup("fit")
    # one image per VAE call, as the fresh encodes below (batched kernels may differ in the last bits)
    counts = data.prepare_cache(module.encode_images, module.encode_prompts, module.cache_fingerprint(),
                                batch_size=1)
    assert counts["latents_encoded"] == 3 * 2 and counts["texts_encoded"] == 1  # both flips; one caption
    dataset = data.train_set.dataset
    for i in range(3):
        pixels = dataset.pixels(i)
        fresh = module.encode_images(pixels[None])[0]
        cached = data.latent_cache.load_latent(dataset.images.paths[i], dataset.crop(i), False)
        assert torch.equal(cached, fresh)
        flipped = data.latent_cache.load_latent(dataset.images.paths[i], dataset.crop(i), True)
        assert torch.equal(flipped, module.encode_images(pixels.flip(-1)[None])[0])
    torch.testing.assert_close(data.latent_cache.load_text("a painting"), module.encode_prompts(["a painting"])[0],
                               atol=0, rtol=0)
    # a cached batch gives the loss of the image batch it came from (same generator draws)
    item = dataset[0]
    assert set(item) == {"latents", "caption", "text_embedding"} and item["latents"].shape == (8, 16, 16)
    flip = bool(torch.equal(item["latents"], data.latent_cache.load_latent(dataset.images.paths[0],
                                                                           dataset.crop(0), True)))
    pixels = dataset.pixels(0, flip)[None]
    batch = {"latents": item["latents"][None], "caption": [item["caption"]],
             "text_embedding": item["text_embedding"][None]}
    cached_loss = module.loss_terms(batch, torch.Generator().manual_seed(5))["loss"]
    fresh_loss = module.loss_terms((pixels, [item["caption"]]), torch.Generator().manual_seed(5))["loss"]
    torch.testing.assert_close(cached_loss, fresh_loss, atol=0, rtol=0)

    # a second run reuses everything; a changed file is re-encoded, the others are kept
    again = make_data(root, **options)
    again.setup("fit")
    counts = again.prepare_cache(module.encode_images, module.encode_prompts, module.cache_fingerprint())
    assert counts == {"latents_encoded": 0, "latents_reused": 6, "texts_encoded": 0, "texts_reused": 1}
    changed = root / "1.png"
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert again.latent_cache.load_latent(changed, dataset.crop(1), False) is None
    with pytest.raises(RuntimeError, match=r"1\.png.*restart"):
        again.train_set.dataset[1]
    counts = again.prepare_cache(module.encode_images, module.encode_prompts, module.cache_fingerprint(),
                                 batch_size=1)
    assert counts["latents_encoded"] == 2 and counts["latents_reused"] == 4
    new = again.latent_cache.load_latent(changed, dataset.crop(1), False)
    assert torch.equal(new, module.encode_images(again.train_set.dataset.pixels(1)[None])[0])
    # another model (here: the encoders in bf16) does not see these entries
    other = LatentCache(tmp_path / "cache", make_module(tiny_sd, frozen_precision="bf16").cache_fingerprint())
    assert other.load_latent(changed, dataset.crop(1), False) is None


def test_training_on_cached_latents_with_buckets_and_checkpointing(tiny_sd: Path, bucket_dir: Path,
                                                                   tmp_path: Path) -> None:
    module = make_module(tiny_sd, gradient_checkpointing=True, noise_offset=0.05, frozen_precision="bf16",
                         validation_prompts=["a harbour"])
    before = {n: p.detach().clone() for n, p in module.named_parameters() if n in module.trainable_names}
    data = make_data(bucket_dir, buckets=True, bucket_step=8, cache_latents=True, cache_text_embeddings=True,
                     latent_cache_dir=str(tmp_path / "cache"), caption_dropout=0.2, repeats=2)
    trainer = fit(module, data, tmp_path / "run", steps=3)
    assert trainer.global_step == 3 and module.vae.dtype == torch.bfloat16
    after = dict(module.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items())
    batch = next(iter(data.train_dataloader()))
    assert batch["latents"].shape[0] in (1, 2) and batch["latents"].shape[1] == 8
    assert batch["text_embedding"].dtype == torch.bfloat16
    assert module.generate(["a harbour"], [0]).shape == (1, 3, 32, 32)  # bf16 VAE with an fp32 UNet


def test_cache_options_are_checked() -> None:
    with pytest.raises(ValueError, match="latent_cache_dir"):
        CaptionedFolderDataModule("x", cache_latents=True)
    with pytest.raises(ValueError, match=r"cache_text_embeddings=true needs data\.cache_latents"):
        CaptionedFolderDataModule("x", cache_text_embeddings=True)
    with pytest.raises(ValueError, match="repeats"):
        CaptionedFolderDataModule("x", repeats=0)


# ---------------------------------------------------------------- precision and optimizers
def test_frozen_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_CPU_FLAGS", "avx2 avx512_bf16")
    assert frozen_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv("ATELIER_CPU_FLAGS", "avx2 amx_bf16")
    assert frozen_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert frozen_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert frozen_dtype("fp32", torch.device("cuda")) == torch.float32
    assert frozen_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="frozen_precision='fp16'"):
        frozen_dtype("fp16", torch.device("cpu"))


def test_adamw_variants_fall_back_with_one_info_line(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import atelier.utils.log_once as log_once

    monkeypatch.setattr(log_once, "_said", set())  # the once-per-process info lines, as in a fresh process
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="atelier.models.adamw_variants"):
        assert adamw_variant(ADAMW, "8bit", cpu) is ADAMW
        assert adamw_variant(ADAMW, "8bit", cpu) is ADAMW
        assert adamw_variant(ADAMW, "fused", cpu) is ADAMW
    notes = [r.getMessage() for r in caplog.records]
    assert sum("8bit needs CUDA and bitsandbytes" in m for m in notes) == 1
    assert sum("fused AdamW is used on CUDA only" in m for m in notes) == 1
    fused = adamw_variant(ADAMW, "auto", cuda)  # not called: no GPU needed
    assert fused.func is torch.optim.AdamW and fused.keywords == {"lr": 1e-2, "fused": True}
    if importlib.util.find_spec("bitsandbytes") is None:
        assert adamw_variant(ADAMW, "8bit", cuda).keywords["fused"] is True
    assert adamw_variant(ADAMW, "auto", cpu) is ADAMW
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    assert adamw_variant(sgd, "fused", cuda) is sgd
    with pytest.raises(ValueError, match="optimizer_variant='lion'"):
        adamw_variant(ADAMW, "lion", cpu)


# ---------------------------------------------------------------- kohya interoperability


def test_kohya_round_trip_and_identical_generate_output(tiny_sd: Path, tmp_path: Path) -> None:
    from atelier.tasks.generate import run

    module = make_module(tiny_sd, rank=4, alpha=8.0)
    with torch.no_grad():  # a non-trivial adapter (B starts at zero)
        for n, p in module.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    source = module.save_lora(tmp_path / "lora")
    convert = load_script("convert_lora_kohya").convert
    kohya = convert(source.parent, tmp_path / "kohya" / "style.safetensors")
    k_tensors, k_meta = read_lora(kohya)
    assert is_kohya(k_tensors) and not is_kohya(read_lora(source)[0])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(k_tensors)
    assert float(k_tensors[f"{name}.alpha"]) == 8.0 and k_meta["ss_network_dim"] == "4"
    back = convert(kohya, tmp_path / "back", model=str(tiny_sd))
    original, restored = load_file(str(source)), load_file(str(back))
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    tensors, config = kohya_to_diffusers(k_tensors)
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert diffusers_to_kohya(tensors, {"lora_adapter_metadata": json.dumps(
        {f"unet.{k}": v for k, v in config.items()})})[0].keys() == k_tensors.keys()

    def images(lora: Path | None, out: str) -> list[np.ndarray]:
        overrides = [f"model_id={tiny_sd}", "num_inference_steps=2", "logger=[]", "sampler=ddim",
                     "prompt=[a harbour,a river]", "seed=3", "lora_scale=0.7"]
        if lora is not None:
            overrides.append(f"lora={lora}")
        info = run(compose_cfg("generate", overrides, tmp_path / out))
        return [np.asarray(Image.open(r["path"]).convert("RGB")) for r in info["images"]]

    diffusers_images = images(source.parent, "g_diffusers")
    kohya_images = images(kohya, "g_kohya")  # diffusers' load_lora_weights reads kohya keys itself
    kohya_dir_images = images(kohya.parent, "g_kohya_dir")  # a folder with one .safetensors
    round_trip_images = images(back.parent, "g_back")
    base = images(None, "g_base")
    assert any(not np.array_equal(a, b) for a, b in zip(diffusers_images, base, strict=True))
    for other in (kohya_images, kohya_dir_images, round_trip_images):
        assert all(np.array_equal(a, b) for a, b in zip(diffusers_images, other, strict=True))


# ---------------------------------------------------------------- configs
def test_art_recipe_turns_the_features_on_and_the_defaults_keep_them_off(tmp_path: Path) -> None:
    art = compose_cfg("train", ["experiment=sd_lora_art", "model.pretrained_model=x"], tmp_path)
    assert art.model.gradient_checkpointing is True and art.model.frozen_precision == "auto"
    assert art.model.optimizer_variant == "auto"
    assert art.data.cache_latents is True and art.data.cache_text_embeddings is True and art.data.buckets is True
    tiny = compose_cfg("train", ["experiment=sd_lora_tiny"], tmp_path)
    assert tiny.model.gradient_checkpointing is False and tiny.model.frozen_precision == "fp32"
    assert tiny.data.cache_latents is False and tiny.data.buckets is False and tiny.model.noise_offset == 0.0
    assert tiny.data.latent_cache_dir.endswith("latent_cache")
