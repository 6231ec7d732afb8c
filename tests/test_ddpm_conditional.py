"""Class-conditional DDPM with classifier-free guidance: the guidance formula, label dropout, overfitting,
sampling with labels and guidance, the sample task's class_labels, and one grid row per class."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from atelier.callbacks.samples import class_rows, save_grid
from atelier.models.ddpm import DDPM
from atelier.nets.unet import build_unet
from atelier.sampling.guidance import apply_guidance, drop_labels, guided_prediction, rows_per_class
from atelier.tasks import sample as sample_task
from atelier.tasks import train as train_task
from atelier.utils.precision import cpu_bf16_pays
from tests.conftest import compose_cfg


def tiny_cond_ddpm(num_classes: int | None = 3, **kwargs) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8, num_classes=num_classes)
    opt = functools.partial(torch.optim.Adam, lr=3e-3)
    return DDPM(net, opt, num_classes=num_classes, **kwargs)


def toy_net(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A toy 'network' whose output is the label value everywhere (null class 9 gives 9)."""
    return torch.ones_like(x) * labels.view(-1, 1, 1, 1).float() + 0 * t.view(-1, 1, 1, 1)


def test_guidance_formula_on_a_toy_model() -> None:
    x, t = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    labels = torch.tensor([0, 1, 2, 3])
    uncond = toy_net(x, t, torch.full_like(labels, 9))
    cond = toy_net(x, t, labels)
    assert torch.equal(guided_prediction(toy_net, x, t, labels, 9, 0.0), uncond)   # w = 0: unconditional
    assert torch.equal(guided_prediction(toy_net, x, t, labels, 9, 1.0), cond)     # w = 1: conditional
    w3 = guided_prediction(toy_net, x, t, labels, 9, 3.0)                           # one 2B batch
    assert torch.allclose(w3, uncond + 3.0 * (cond - uncond))
    assert torch.allclose(w3[:, 0, 0, 0], torch.tensor([-18.0, -15.0, -12.0, -9.0]))
    assert torch.equal(apply_guidance(uncond, cond, 0.5), (uncond + cond) / 2)


def test_label_dropout_rate_and_null_class() -> None:
    labels = torch.randint(0, 10, (40_000,))
    dropped = drop_labels(labels, 10, 0.25, torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert 0.24 < is_null.float().mean() < 0.26
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)


def test_rows_per_class_puts_one_class_on_each_grid_row() -> None:
    assert rows_per_class(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert rows_per_class(5, 3).tolist() == [0, 0, 1, 1, 2]
    model = tiny_cond_ddpm(10)
    assert class_rows(model, 100) == 10 and class_rows(tiny_cond_ddpm(None), 100) is None


def test_conditional_ddpm_overfits_one_batch() -> None:
    model = tiny_cond_ddpm(3, cond_drop_prob=0.1, prediction_type="v_prediction")
    # three classes that differ only in brightness: the label tells the network what x0 is
    labels = torch.arange(3).repeat(6)
    x0 = (labels.float() - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)

    def eval_loss(y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(torch.stack([model.diffusion_loss(x0, torch.Generator().manual_seed(s), y)
                                      for s in range(8)]).mean())

    before = eval_loss(labels)
    for _ in range(150):
        _, dropped = model._batch((x0, labels))
        loss = model.diffusion_loss(x0, labels=dropped)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss(labels)
    assert after < 0.5 * before, (before, after)
    # the label carries information: the conditional loss is below the null-class loss
    assert after < eval_loss(torch.full_like(labels, 3))


def test_sampling_with_labels_and_guidance() -> None:
    model = tiny_cond_ddpm(3)
    with torch.no_grad():  # make the class embedding matter
        model.ema.module.class_embedding.weight.normal_(0, 3)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    zeros, twos = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    a = model.sample(4, generator=g(), num_inference_steps=3, labels=zeros, guidance_scale=1.0)
    b = model.sample(4, generator=g(), num_inference_steps=3, labels=twos, guidance_scale=1.0)
    assert a.shape == (4, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, b)  # the label changes the samples
    # w = 0 ignores the label: both equal the unconditional (null-class) samples
    u0 = model.sample(4, generator=g(), num_inference_steps=3, labels=zeros, guidance_scale=0.0)
    u2 = model.sample(4, generator=g(), num_inference_steps=3, labels=twos, guidance_scale=0.0)
    assert torch.equal(u0, u2)
    for sampler in ("ddpm", "ddim", "dpmpp"):
        guided = model.sample(4, generator=g(), sampler=sampler, num_inference_steps=3, labels=zeros,
                              guidance_scale=3.0, batch_size=3)
        assert guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all()
    # default labels: one class per grid row, the same as asking for them explicitly
    default = model.sample(6, generator=g(), num_inference_steps=3)
    explicit = model.sample(6, generator=g(), num_inference_steps=3, labels=rows_per_class(6, 3))
    assert torch.equal(default, explicit)


def test_conditioning_errors_are_clear() -> None:
    uncond = tiny_cond_ddpm(None)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.sample(2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.sample(2, guidance_scale=3.0)
    cond = tiny_cond_ddpm(3)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        cond.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        cond.sample(3, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        cond.training_step(torch.zeros(2, 1, 8, 8), 0)
    net = build_unet(8, 1, block_out_channels=(16, 32), attention_resolutions=(), norm_num_groups=8)
    with pytest.raises(ValueError, match="num_class_embeds=4"):
        DDPM(net, functools.partial(torch.optim.Adam, lr=1e-3), num_classes=3)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        tiny_cond_ddpm(3, cond_drop_prob=1.0)


def test_train_and_sample_task_with_class_labels(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                                 mnist_available: Path) -> None:
    cfg = train_cfg("data.image_size=16", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                    "model.num_classes=10", "callbacks.sample_grid.num_samples=20", "export_pipeline=false")
    metrics = train_task.run(cfg)
    assert metrics["global_step"] == 3
    final = Image.open(tmp_path / "samples" / "final.png")
    # 20 samples, 10 classes: 2 per row, 10 rows of 16 px images with 2 px padding
    assert final.size == (2 * 18 + 2, 10 * 18 + 2)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    model = sample_task.load_module(ckpt)
    assert model.num_classes == 10
    scfg = compose_cfg("sample", [f"ckpt_path={ckpt}", "num_samples=6", "class_labels=[7,1,4]",
                                  "guidance_scale=2.5", "num_inference_steps=2", "save_images=false"],
                       tmp_path / "sample")
    info = sample_task.run(scfg)
    assert info["labels"] == [7, 7, 1, 1, 4, 4]
    assert info["sample_kwargs"]["guidance_scale"] == 2.5
    # autocast=true (default) resolves to bf16 only on a CPU with AMX; the reference below samples the same way
    assert info["sample_kwargs"]["autocast"] is cpu_bf16_pays()
    assert Image.open(tmp_path / "sample" / "grid.png").size == (2 * 18 + 2, 3 * 18 + 2)
    expected = model.sample(6, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                            labels=torch.tensor([7, 7, 1, 1, 4, 4]), guidance_scale=2.5,
                            autocast=info["sample_kwargs"]["autocast"])
    save_grid(expected, tmp_path / "expected.png", nrow=2)
    assert (tmp_path / "sample" / "grid.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    assert json.loads((tmp_path / "sample" / "sample_info.json").read_text())["labels"] == info["labels"]
    bad = compose_cfg("sample", [f"ckpt_path={ckpt}", "class_labels=[1]", "class_label=2"], tmp_path / "bad")
    with pytest.raises(ValueError, match="not both"):
        sample_task.run(bad)


def test_datamodule_class_count_must_match(train_cfg: Callable[..., DictConfig], mnist_available: Path) -> None:
    cfg = train_cfg("data.image_size=16", "trainer.max_steps=1", "model.num_classes=7", "export_pipeline=false")
    with pytest.raises(ValueError, match=r"model\.num_classes=7 but the datamodule has 10"):
        train_task.run(cfg)


def test_conditional_ddpm_on_art_folder_artists(train_cfg: Callable[..., DictConfig], tmp_path: Path,
                                                mnist_available: Path) -> None:
    """The art folder's subfolders (monet, pissarro, sisley) are the classes; the grid has one artist per row."""
    cfg = train_cfg("data=art", "data.image_size=16", "data.check_images=false", "data.num_workers=0",
                    "trainer.max_steps=2", "trainer.limit_val_batches=1", "model.num_classes=3",
                    "callbacks.sample_grid.num_samples=6", "export_pipeline=false")
    train_task.run(cfg)
    model = sample_task.load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert model.num_classes == 3 and model.net.class_embedding.num_embeddings == 4  # 3 artists + null class
    assert Image.open(tmp_path / "samples" / "final.png").size == (2 * 18 + 2, 3 * 18 + 2)
