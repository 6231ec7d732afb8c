"""LoRA / DreamBooth fine-tuning of the tiny random-weight Stable Diffusion: only LoRA parameters train, the
adapter round-trips through diffusers' LoRA format, checkpoints hold LoRA only and resume, prior loss counts."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from atelier.data.captioned_folder import CaptionedFolderDataModule, caption_for
from atelier.models.sd_lora import StableDiffusionLoRA
from atelier.tasks.sample import load_module
from atelier.text2image.pipeline import apply_lora, load_text2image
from tests import sd_fixtures
from tests.conftest import compose_cfg

tiny_sd = sd_fixtures.tiny_sd
caption_dir = sd_fixtures.caption_dir

PROMPTS = ["a harbour at dawn", "a river with poplars"]


def make_module(tiny_sd: Path, **kwargs: object) -> StableDiffusionLoRA:
    options = {"optimizer": functools.partial(torch.optim.AdamW, lr=1e-2), "rank": 4, "alpha": 8.0,
               "validation_prompts": PROMPTS, "num_inference_steps": 2, "sampler": "ddim", **kwargs}
    return StableDiffusionLoRA(str(tiny_sd), **options)


def make_data(root: Path, **kwargs: object) -> CaptionedFolderDataModule:
    options = {"image_size": 32, "batch_size": 2, "val_fraction": 0.2, "instance_prompt": "a painting by {label}",
               "check_images": False, **kwargs}
    return CaptionedFolderDataModule(str(root), **options)


def fit(module: L.LightningModule, data: L.LightningDataModule, root: Path, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=steps,
                        check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    return trainer


def frozen_state(module: StableDiffusionLoRA) -> dict[str, torch.Tensor]:
    full = super(StableDiffusionLoRA, module).state_dict()
    return {k: v.clone() for k, v in full.items() if k not in module.trainable_names}


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, caption_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A module trained 3 steps, with its weights before and after, and its run directory."""
    torch.manual_seed(0)
    module = make_module(tiny_sd, alpha=8.0)
    before_frozen = frozen_state(module)
    before_lora = {n: p.detach().clone() for n, p in module.named_parameters() if n in module.trainable_names}
    root = tmp_path_factory.mktemp("lora_run")
    trainer = fit(module, make_data(caption_dir), root)
    return {"module": module, "frozen": before_frozen, "lora": before_lora, "root": root, "trainer": trainer}


def test_only_lora_parameters_change(trained: dict) -> None:
    module: StableDiffusionLoRA = trained["module"]
    assert trained["trainer"].global_step == 3
    assert module.trainable_names and all(".lora_" in n for n in module.trainable_names)
    after = frozen_state(module)
    assert after.keys() == trained["frozen"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["frozen"].items())  # base UNet, VAE, text encoder
    changed = [n for n, p in module.named_parameters() if n in module.trainable_names
               and not torch.equal(p.detach(), trained["lora"][n])]
    assert len(changed) == len(module.trainable_names)


def test_validation_logs_images_and_clip_score(trained: dict) -> None:
    metrics = trained["trainer"].callback_metrics
    assert "val/loss" in metrics and torch.isfinite(metrics["val/loss"])
    assert 0.0 <= float(metrics["val/clip_score"]) <= 100.0
    assert (trained["root"] / "samples" / "val_step_0000003.png").is_file()


def test_adapter_saved_in_diffusers_format_and_loads(trained: dict, tiny_sd: Path) -> None:
    module: StableDiffusionLoRA = trained["module"]
    file = trained["root"] / "lora" / "pytorch_lora_weights.safetensors"
    assert file.is_file() and (file.parent / "atelier_lora.json").is_file()
    keys = load_file(str(file)).keys()
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)

    def images(lora_scale: float | None) -> torch.Tensor:
        pipe = load_text2image(str(tiny_sd), device="cpu")
        pipe.scheduler = module.pipeline().scheduler
        if lora_scale is not None:
            apply_lora(pipe, file.parent, lora_scale)
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe(PROMPTS, num_inference_steps=2, generator=gens, output_type="pt").images

    base, adapted, zero = images(None), images(1.0), images(0.0)
    assert not torch.allclose(base, adapted, atol=1e-3)
    assert torch.equal(base, zero)  # lora_scale=0 is the base model exactly
    # the loaded adapter (rank 4, alpha 8 from the file's metadata) reproduces the trained module's images
    torch.testing.assert_close(adapted * 2 - 1, module.generate(PROMPTS, [0, 1]), atol=1e-4, rtol=0)


def test_train_task_checkpoint_holds_lora_only_and_resumes(tiny_sd: Path, caption_dir: Path, tmp_path: Path) -> None:
    from atelier.tasks.train import run

    overrides = ["experiment=sd_lora_tiny", f"model.pretrained_model={tiny_sd}", f"data.root={caption_dir}",
                 "data.check_images=false", "data.val_fraction=0.2", "logger=csv", "print_config=false",
                 "model.num_inference_steps=2", "model.validation_prompts=[a harbour]",
                 "trainer.val_check_interval=2", "trainer.max_steps=2",
                 "callbacks.model_checkpoint.every_n_train_steps=2",
                 "callbacks.sample_grid.on_train_end=false", "~callbacks.rich_progress_bar",
                 "~callbacks.model_summary"]
    metrics = run(compose_cfg("train", overrides, tmp_path / "a"))
    assert metrics["global_step"] == 2
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(".lora_" in k for k in state)
    assert ckpt.stat().st_size < 2_000_000
    assert (tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    loaded = load_module(ckpt)  # the stored model config rebuilds the module; the LoRA weights load
    assert isinstance(loaded, StableDiffusionLoRA)
    assert all(torch.equal(dict(loaded.named_parameters())[k], v) for k, v in state.items())

    resumed = run(compose_cfg("train", [*overrides[:-4], "trainer.max_steps=4", f"ckpt_path={ckpt}",
                                        *overrides[-3:]], tmp_path / "b"))
    assert resumed["global_step"] == 4
    state_b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state_b.keys() == state.keys() and any(not torch.equal(state_b[k], state[k]) for k in state)


def test_strict_load_names_missing_lora_parameters(tiny_sd: Path) -> None:
    module = make_module(tiny_sd)
    with pytest.raises(RuntimeError, match="LoRA parameters"):
        module.load_state_dict({})


def test_captions_from_sidecar_or_instance_prompt(caption_dir: Path) -> None:
    assert caption_for(caption_dir / "monet" / "01.png", "monet", "x") == "a harbour painting number 1"
    assert caption_for(caption_dir / "sisley" / "01.png", "sisley", "a painting by {label}") == "a painting by sisley"
    with pytest.raises(ValueError, match=r"sisley/01\.png.*instance_prompt"):
        caption_for(caption_dir / "sisley" / "01.png", "sisley", None)
    data = make_data(caption_dir)
    data.setup("fit")
    images, captions = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert all(isinstance(c, str) and c for c in captions)


def test_dreambooth_class_images_cached_and_prior_loss_counts(tiny_sd: Path, caption_dir: Path,
                                                                tmp_path: Path) -> None:
    class_dir = tmp_path / "class"
    module = make_module(tiny_sd, prior_loss_weight=1.0)
    data = make_data(caption_dir, instance_prompt="a painting in the style of sks", class_prompt="a painting",
                     class_data_dir=str(class_dir), num_class_images=2)
    data.setup("fit")
    with pytest.raises(RuntimeError, match="class images"):
        data.train_dataloader()
    fit(module, data, tmp_path / "run", steps=1)  # setup generates the class images once
    cached = sorted(class_dir.glob("class_*.png"))
    assert len(cached) == 2
    mtimes = [p.stat().st_mtime_ns for p in cached]
    data.ensure_class_images(module.generate_base)  # cached: nothing is drawn again
    assert [p.stat().st_mtime_ns for p in cached] == mtimes

    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4 and batch[2].shape == batch[0].shape and list(batch[3]) == ["a painting"] * 2
    terms = module.loss_terms(batch, torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "instance_loss", "prior_loss"} and terms["prior_loss"] > 0
    torch.testing.assert_close(terms["loss"], terms["instance_loss"] + terms["prior_loss"])
    module.hparams.prior_loss_weight = 0.0
    without = module.loss_terms(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(without["instance_loss"], terms["instance_loss"])
    assert not torch.allclose(without["loss"], terms["loss"])


def test_min_snr_weighting_changes_the_loss(tiny_sd: Path) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = make_module(tiny_sd).per_sample_loss(images, PROMPTS, torch.Generator().manual_seed(0))
    # γ below the smallest SNR of the schedule (≈ 0.005): every timestep's weight min(SNR, γ)/SNR is < 1
    weighted = make_module(tiny_sd, min_snr_gamma=1e-3).per_sample_loss(images, PROMPTS,
                                                                       torch.Generator().manual_seed(0))
    assert plain.shape == (2,) and bool((weighted < plain).all())


def test_bad_options_name_the_key(tiny_sd: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.sampler='euler'.*dpmpp"):
        make_module(tiny_sd, sampler="euler")
    with pytest.raises(ValueError, match=r"model\.target_modules"):
        make_module(tiny_sd, target_modules=["no_such_layer"])
