"""Style transfer: losses by hand, AdaIN statistics, Gatys optimisation, colour preservation, image I/O, the
fast-style and AdaIN modules through the real train task, and the stylize task (all with random VGG weights)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.style import vgg as vgg_module
from atelier.style.adain import AdaINDecoder, adain, blend_adain
from atelier.style.color import luma_chroma_to_rgb, preserve_color, rgb_to_luma_chroma
from atelier.style.io import load_image, read_png_metadata, save_png, side_by_side
from atelier.style.losses import (
    blend_grams,
    content_loss,
    gram_matrix,
    mean_std,
    style_loss,
    total_variation,
)
from atelier.style.optimize import stylize_gatys
from atelier.style.transformer_net import TransformerNet
from atelier.style.vgg import LAYER_NAMES, VGGFeatures, VGGWeightsError, weights_file
from atelier.tasks import stylize as stylize_task
from atelier.tasks import train as train_task
from tests.conftest import DATA_DIR, compose_cfg

STYLE = DATA_DIR / "style" / "starry_night.jpg"
CONTENT = DATA_DIR / "content" / "tubingen.jpg"
TINY_FAST = ["model.net.base_channels=8", "model.net.num_residual=1", "model.style_size=64",
             "model.vgg_weights=random"]
TINY_ADAIN = ["model.decoder.channels=[16,8,8]", "model.decoder.convs_per_stage=[1,0,0]", "model.vgg_weights=random"]
TRAIN_BASE = ["logger=csv", "print_config=false", "data=art", "data.image_size=32", "data.batch_size=4",
              "data.num_workers=0", "debug=fdr", "callbacks.sample_grid.num_samples=4", "~callbacks.rich_progress_bar",
              "~callbacks.model_summary"]


# ----------------------------------------------------------------------------------------------- losses by hand
def test_gram_matrix_by_hand() -> None:
    # two channels of a 1x2 image: a = [1, 2], b = [3, 4]; F Fᵀ = [[5, 11], [11, 25]], C·H·W = 4
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    torch.testing.assert_close(gram_matrix(f), torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[[[0.0, 1.0], [3.0, 5.0]]]])  # vertical diffs 3, 4; horizontal 1, 2
    assert total_variation(x, beta=1).item() == pytest.approx(3.5 + 1.5)
    assert total_variation(x, beta=2).item() == pytest.approx(12.5 + 2.5)
    assert total_variation(torch.full((2, 3, 5, 5), 0.3)).item() == 0


def test_content_and_style_loss_by_hand() -> None:
    a, b = torch.zeros(1, 2, 1, 2), torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    assert content_loss(b, a).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    grams = {"relu1_1": gram_matrix(b)}
    targets = {"relu1_1": torch.zeros(1, 2, 2)}
    # mean of squared Gram entries 1.25², 2.75², 2.75², 6.25², times the layer weight 2
    expected = 2 * (1.25**2 + 2 * 2.75**2 + 6.25**2) / 4
    assert style_loss(grams, targets, {"relu1_1": 2.0}).item() == pytest.approx(expected)


def test_blend_grams_weights() -> None:
    g1, g2 = {"l": torch.ones(1, 2, 2)}, {"l": torch.zeros(1, 2, 2)}
    torch.testing.assert_close(blend_grams([g1, g2], [3, 1])["l"], torch.full((1, 2, 2), 0.75))
    with pytest.raises(ValueError, match="style_weights"):
        blend_grams([g1, g2], [1.0])


# ----------------------------------------------------------------------------------------------- AdaIN
def test_adain_output_has_style_channel_mean_and_std() -> None:
    torch.manual_seed(0)
    content = torch.randn(2, 8, 6, 5) * 3 + 1
    style = torch.randn(2, 8, 9, 7) * torch.rand(1, 8, 1, 1) * 4 - torch.rand(1, 8, 1, 1)
    out = adain(content, style)
    assert out.shape == content.shape
    for got, want in zip(mean_std(out), mean_std(style), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_adain_alpha_and_mixing() -> None:
    torch.manual_seed(0)
    c, s1, s2 = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5) + 2, torch.randn(1, 4, 5, 5) * 3
    torch.testing.assert_close(blend_adain(c, [s1], alpha=0.0), c)
    torch.testing.assert_close(blend_adain(c, [s1, s2], [1.0, 0.0]), adain(c, s1))
    torch.testing.assert_close(blend_adain(c, [s1, s2], [1, 1], alpha=0.5),
                               0.5 * (0.5 * adain(c, s1) + 0.5 * adain(c, s2)) + 0.5 * c)
    with pytest.raises(ValueError, match="alpha"):
        blend_adain(c, [s1], alpha=1.5)


def test_networks_keep_any_image_size() -> None:
    net = TransformerNet(base_channels=4, num_residual=1)
    assert net(torch.randn(1, 3, 37, 22)).shape == (1, 3, 37, 22)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert AdaINDecoder(512, (8, 8, 4), (1, 0, 0))(torch.randn(1, 512, 3, 5)).shape == (1, 3, 24, 40)


# ----------------------------------------------------------------------------------------------- VGG
def test_vgg_layers_shapes_and_frozen() -> None:
    assert LAYER_NAMES[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1") and len(LAYER_NAMES) == 37
    vgg = VGGFeatures(["relu1_1", "relu3_1", "relu4_2"], weights="random")
    assert list(vgg.net.named_children())[-1][0] == "relu4_2"  # cut after the deepest requested layer
    x = torch.rand(2, 3, 32, 24, requires_grad=True)
    feats = vgg(x * 2 - 1)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "relu1_1": (2, 64, 32, 24), "relu3_1": (2, 256, 8, 6), "relu4_2": (2, 512, 4, 3)}
    assert not any(p.requires_grad for p in vgg.parameters())
    feats["relu4_2"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="relu9_1"):
        VGGFeatures(["relu9_1"], weights="random")
    with pytest.raises(ValueError, match=r"too small for VGG-19 layer relu4_2.*8 px"):
        vgg(torch.zeros(1, 3, 7, 30))


def test_random_vgg_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = VGGFeatures(["relu1_1"], "random", seed=1), VGGFeatures(["relu1_1"], "random", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a.net.conv1_1.weight, b.net.conv1_1.weight)


def test_missing_imagenet_weights_error_names_file_and_folder(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    assert weights_file() == tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(VGGWeightsError) as info:
        vgg_module.load_vgg19("imagenet")
    message = str(info.value)
    assert "vgg19-dcbb9e9d.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message and "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message


def test_corrupt_weights_file_gives_the_same_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights_file().parent.mkdir(parents=True)
    weights_file().write_bytes(b"not a checkpoint")
    with pytest.raises(VGGWeightsError, match=r"vgg19-dcbb9e9d\.pth"):
        vgg_module.load_vgg19("imagenet")


# ----------------------------------------------------------------------------------------------- Gatys
@pytest.fixture(scope="module")
def small_vgg() -> VGGFeatures:
    return VGGFeatures(["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"], weights="random")


@pytest.mark.parametrize(("optimizer", "init"), [("lbfgs", "content"), ("adam", "noise"), ("lbfgs", "style")])
def test_a_few_optimisation_steps_lower_the_total_loss(small_vgg, optimizer: str, init: str) -> None:
    torch.manual_seed(0)
    content, style = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 40, 28) * 2 - 1
    result = stylize_gatys(content, [style], small_vgg, optimizer=optimizer, init=init, steps=8, tv_weight=0.01,
                           progress=False, generator=torch.Generator().manual_seed(0))
    totals = [h["total"] for h in result.history]
    assert result.evaluations == len(totals) >= 8 if optimizer == "adam" else len(totals) >= 2
    assert totals[-1] < 0.9 * totals[0]
    assert result.image.shape == content.shape and result.image.abs().max() <= 1


def test_several_styles_with_weights_and_colour_preservation(small_vgg) -> None:
    torch.manual_seed(0)
    content = torch.rand(1, 3, 32, 32) * 0.8 - 0.4
    styles = [torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 24, 24) * 2 - 1]
    result = stylize_gatys(content, styles, small_vgg, style_weights=[0.7, 0.3], steps=5, progress=False,
                           preserve_colors=True)
    out, c = rgb_to_luma_chroma(result.image), rgb_to_luma_chroma(content)
    inside = (result.image.abs() < 0.99).all(dim=1, keepdim=True).expand(-1, 2, -1, -1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(out[:, 1:][inside], c[:, 1:][inside], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="style_weights"):
        stylize_gatys(content, styles, small_vgg, style_weights=[1.0], steps=1, progress=False)


# ----------------------------------------------------------------------------------------------- colour
@pytest.mark.parametrize("space", ["yiq", "ycbcr"])
def test_colour_preservation_keeps_the_content_chroma(space: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(luma_chroma_to_rgb(rgb_to_luma_chroma(x, space), space), x, atol=1e-5, rtol=0)
    content = torch.rand(1, 3, 16, 16) * 0.6 - 0.3  # moderate colours: no clamping after recombination
    stylized = torch.rand(1, 3, 16, 16) * 0.6 - 0.3
    out = preserve_color(stylized, content, space)
    got, want_chroma, want_luma = (rgb_to_luma_chroma(t, space) for t in (out, content, stylized))
    torch.testing.assert_close(got[:, 1:], want_chroma[:, 1:], atol=1e-5, rtol=0)  # chroma of the content
    torch.testing.assert_close(got[:, :1], want_luma[:, :1], atol=1e-5, rtol=0)  # luminance of the stylised
    assert preserve_color(stylized, torch.rand(1, 3, 32, 40) * 2 - 1, space).shape == stylized.shape


# ----------------------------------------------------------------------------------------------- image I/O
@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_load_image_converts_any_mode(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((12, 20), 65535, dtype=np.uint16))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    x = load_image(path)
    assert x.shape == (1, 3, 12, 20) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    if mode == "I;16":
        assert torch.allclose(x, torch.ones_like(x))
    assert load_image(path, size=10).shape == (1, 3, 6, 10)


def test_missing_or_unreadable_input_file_errors_name_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_image(bad)


def test_png_metadata_and_panel(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 10, 14) * 2 - 1
    path = save_png(x, tmp_path / "a.png", {"method": "gatys", "steps": 3})
    assert read_png_metadata(path) == {"method": "gatys", "steps": 3}
    torch.testing.assert_close(load_image(path), x, atol=1 / 127.5, rtol=0)
    panel = side_by_side([x, torch.rand(1, 3, 20, 20), torch.rand(1, 1, 5, 5)], gap=4)
    assert panel.shape == (1, 3, 10, 14 + 4 + 10 + 4 + 10)


# ----------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize(("model", "tiny"), [("fast_style", TINY_FAST), ("adain", TINY_ADAIN)])
def test_fast_dev_run_through_the_train_task(tmp_path: Path, model: str, tiny: list[str]) -> None:
    cfg = compose_cfg("train", [f"model={model}", *TRAIN_BASE, *tiny], tmp_path)
    metrics = train_task.run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert metrics["train/style"] > 0
    assert not (tmp_path / "samples" / "final.png").exists()  # no sample(): image-to-image grids only
    assert (tmp_path / "samples" / "stylization_final.png").is_file()


def test_missing_style_image_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["model=fast_style", *TRAIN_BASE, *TINY_FAST,
                                f"model.style_image={tmp_path / 'missing.jpg'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model.style_image.*missing.jpg"):
        train_task.run(cfg)


def _checkpoint(model: str, tiny: list[str], tmp_path: Path) -> Path:
    """A checkpoint of an untrained module in the format the train task writes (weights + model config)."""
    cfg = compose_cfg("train", [f"model={model}", "data=art", "data.image_size=32", *tiny], tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    path = tmp_path / f"{model}.ckpt"
    torch.save({"state_dict": module.state_dict(),
                CONFIG_KEY: {"model": OmegaConf.to_container(cfg.model, resolve=True)}}, path)
    return path


def _stylize_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg("stylize", [f"content={CONTENT}", "size=32", "~logger", "progress=false", *overrides],
                       tmp_path / "run")


def test_stylize_task_gatys_random_vgg_is_labelled_as_not_a_stylisation(tmp_path: Path) -> None:
    cfg = _stylize_cfg(tmp_path, f"style=[{STYLE},{DATA_DIR / 'style' / 'udnie.jpg'}]", "style_weights=[0.5,0.5]",
                       "gatys.vgg_weights=random", "gatys.steps=3", "preserve_color=true")
    info = stylize_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    meta = read_png_metadata(out / "stylized.png")
    assert meta["valid_stylization"] is False and "NOT a style transfer" in meta["note"]
    assert meta["vgg_weights"] == "random" and meta["style_weights"] == [0.5, 0.5]
    assert Image.open(out / "stylized.png").size == (32, 24)  # tubingen is 512 x 384
    assert Image.open(out / "panel.png").size[0] > 3 * 32
    assert info["loss/total"] < info["loss_initial/total"]
    assert json.loads((out / "stylize_info.json").read_text())["method"] == "gatys"


@pytest.mark.parametrize(("method", "model", "tiny"), [("fast", "fast_style", TINY_FAST),
                                                       ("adain", "adain", TINY_ADAIN)])
def test_stylize_task_applies_a_checkpoint(tmp_path: Path, method: str, model: str, tiny: list[str]) -> None:
    ckpt = _checkpoint(model, tiny, tmp_path)
    cfg = _stylize_cfg(tmp_path, f"method={method}", f"ckpt_path={ckpt}", f"style={STYLE}", "alpha=0.5",
                       "preserve_color=true")
    stylize_task.run(cfg)
    out = Path(cfg.paths.output_dir)
    assert Image.open(out / "stylized.png").size == (32, 24)
    assert read_png_metadata(out / "stylized.png")["valid_stylization"] is False  # trained against random VGG


def test_stylize_task_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such\.jpg"):
        stylize_task.run(compose_cfg("stylize", [f"content={tmp_path / 'no_such.jpg'}", f"style={STYLE}", "~logger"],
                                     tmp_path))
    with pytest.raises(ValueError, match="ckpt_path"):
        stylize_task.run(_stylize_cfg(tmp_path, "method=fast"))
    ckpt = _checkpoint("fast_style", TINY_FAST, tmp_path)
    with pytest.raises(ValueError, match="not a model=adain checkpoint"):
        stylize_task.run(_stylize_cfg(tmp_path, "method=adain", f"ckpt_path={ckpt}", f"style={STYLE}"))


@pytest.mark.slow
def test_stylize_logs_to_wandb_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg("stylize", [f"content={CONTENT}", f"style={STYLE}", "size=48", "gatys.vgg_weights=random",
                                  "gatys.steps=2", "progress=false"], tmp_path)
    stylize_task.run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").glob("panel_*.png"))
