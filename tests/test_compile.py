"""``model.compile=true``: torch.compile of the DDPM's training network trains like eager and checkpoints alike."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from atelier.models.ddpm import DDPM
from atelier.nets.unet import build_unet


def tiny_ddpm(compile_net: bool) -> DDPM:
    torch.manual_seed(0)
    net = build_unet(8, 1, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                     norm_num_groups=8)
    return DDPM(net, functools.partial(torch.optim.SGD, lr=0.05), beta_schedule="squaredcos_cap_v2",
                prediction_type="v_prediction", compile=compile_net)


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(compile_net: bool, tmp_path: Path, steps: int = 8) -> tuple[DDPM, list[float], Path]:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loader = DataLoader(TensorDataset(x), batch_size=8, shuffle=False, drop_last=True)
    model, log = tiny_ddpm(compile_net), LossLog()
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[log], default_root_dir=tmp_path,
                        enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    ckpt = tmp_path / f"compile_{compile_net}.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, log.losses, ckpt


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_load_eager(tmp_path: Path) -> None:
    eager, eager_losses, _ = fit(False, tmp_path)
    compiled, compiled_losses, ckpt = fit(True, tmp_path)
    assert getattr(compiled.net, "_compiled_call_impl", None) is not None, "model.compile=true did not compile"
    assert getattr(eager.net, "_compiled_call_impl", None) is None
    assert getattr(compiled.ema.module, "_compiled_call_impl", None) is None, "the sampling EMA copy must stay eager"
    assert len(compiled_losses) == len(eager_losses) == 8
    # same seed, same batches: the compiled graph computes the same losses and ends at the same weights (SGD, whose
    # update is linear in the gradient; Adam's normalisation turns float-reordering noise in near-zero gradients
    # into whole lr-sized steps)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
    for (name, a), (_, b) in zip(eager.net.state_dict().items(), compiled.net.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    # the checkpoint of a compiled run has the eager keys: an eager DDPM loads it strictly and samples the same
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    restored = tiny_ddpm(False)
    restored.load_state_dict(state, strict=True)
    a = restored.sample(4, generator=torch.Generator().manual_seed(0), sampler="dpmpp_sde", num_inference_steps=5)
    b = compiled.sample(4, generator=torch.Generator().manual_seed(0), sampler="dpmpp_sde", num_inference_steps=5)
    assert a.shape == (4, 1, 8, 8) and torch.allclose(a, b, atol=1e-5)


def test_without_a_cpp_compiler_the_network_stays_eager(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """TorchInductor's own compiler search finds nothing: ``configure_model`` warns and leaves the network eager
    (it would otherwise fail at the first step with InvalidCxxCompiler)."""
    import torch._inductor.config as inductor_config

    from atelier.utils.compile import missing_cpu_compiler

    assert missing_cpu_compiler() is None  # this machine has one (the slow compile test above needs it too)
    monkeypatch.delenv("CXX", raising=False)
    with inductor_config.patch({"cpp.cxx": ("atelier-no-such-compiler++",)}):  # restored on exit
        message = missing_cpu_compiler()
        assert message is not None and "no C++ compiler" in message and "g++" in message
        model = tiny_ddpm(True)
        with caplog.at_level("WARNING", logger="atelier.models.ddpm"):
            model.configure_model()
    assert missing_cpu_compiler() is None
    assert getattr(model.net, "_compiled_call_impl", None) is None
    assert "model.compile=true but TorchInductor found no C++ compiler" in caplog.text


def test_validation_of_a_compiled_network_runs_eagerly(tmp_path: Path) -> None:
    """Validation's path (the network's forward called directly, so that no-grad eval mode does not recompile the
    graph) computes the same loss as an uncompiled model with the same weights and noise."""
    model = tiny_ddpm(True)
    model.configure_model()
    assert getattr(model.net, "_compiled_call_impl", None) is not None
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        eager = model.diffusion_loss(x, torch.Generator().manual_seed(0), net=model.net.forward)
        default = tiny_ddpm(False).diffusion_loss(x, torch.Generator().manual_seed(0))
    assert eager.shape == () and torch.isfinite(eager)
    assert float(eager) == pytest.approx(float(default), rel=1e-5)  # same weights (seed 0), same noise
