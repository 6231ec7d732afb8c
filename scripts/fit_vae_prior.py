"""Fit the ex-post Gaussian-mixture sampling prior (Ghosh et al. 2020, Sec. 4) to an existing VAE checkpoint.

    python scripts/fit_vae_prior.py outputs/vae_mnist_cpu/<date>/<time>/checkpoints/last.ckpt --components 10
    python sample.py ckpt_path=outputs/vae_mnist_cpu/<date>/<time>/checkpoints/last_gmm.ckpt

Rebuilds the VAE from the checkpoint (its stored model config, as sample.py does) and the datamodule it was trained
on (its stored data config, as evaluate.py does; ``--data-dir`` points it at another copy of the data), encodes the
training set (unshuffled, the encoder in eval mode), fits a ``k``-component full-covariance Gaussian mixture to the
posterior means and writes a new checkpoint (default: ``<name>_gmm.ckpt`` beside the input) whose stored model
config says ``sampling_prior: gmm``. Everything else (optimizer states, global step, RNG states) is copied, so the
new checkpoint still resumes training. The input is never changed unless ``--out`` names it. Details:
docs/vae_prior.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from atelier.callbacks.checkpoint_extras import CONFIG_KEY
from atelier.data.loaders import make_loader
from atelier.models.vae import VAE
from atelier.tasks.evaluate import reference_datamodule
from atelier.tasks.sample import load_module, stored_config

log = logging.getLogger("fit_vae_prior")


def default_out(ckpt: Path) -> Path:
    """``<dir>/<stem>_gmm.ckpt`` beside ``ckpt``."""
    return ckpt.with_name(f"{ckpt.stem}_gmm{ckpt.suffix or '.ckpt'}")


def upgrade_checkpoint(ckpt_path: str | Path, out: str | Path | None = None, components: int | None = None,
                       max_samples: int | None = None, data_dir: str | None = None, device: str = "cpu",
                       batch_size: int | None = None) -> dict[str, Any]:
    """Fit the mixture prior to the VAE in ``ckpt_path`` and save the result to ``out``.

    Args:
        ckpt_path: an Atelier VAE checkpoint (with or without a mixture).
        out: the new checkpoint (default :func:`default_out`); may equal ``ckpt_path`` to overwrite it.
        components: ``k`` (default: the checkpoint's ``gmm_components``, else 10).
        max_samples: training images encoded at most (default: the checkpoint's ``gmm_max_samples``).
        data_dir: another ``data_dir`` for the stored data config (e.g. the data on this machine).
        device: where the encoder runs.
        batch_size: encoding batch size (default: the stored data config's).

    Returns:
        ``{"out", "components", "num_samples", "mean_log_likelihood", "standard_log_likelihood", "converged"}``.

    Raises:
        FileNotFoundError: when ``ckpt_path`` does not exist.
        KeyError: when neither the checkpoint nor its run directory holds a model or data config.
        TypeError: when the checkpoint does not hold a VAE.
        ValueError: for ``components < 1`` or an empty training set.
    """
    path = Path(ckpt_path).expanduser()
    model = load_module(path, map_location="cpu")
    if not isinstance(model, VAE):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a VAE: only VAEs have a latent sampling prior")
    if components is not None and components < 1:
        raise ValueError(f"--components must be >= 1, got {components}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model_cfg = stored_config(checkpoint, path, "model")
    data_cfg = stored_config(checkpoint, path, "data")
    model = model.to(device)

    datamodule = reference_datamodule(path, data_dir)
    train_set = getattr(datamodule, "train_set", None)
    hp = getattr(datamodule, "hparams", {})
    if train_set is not None:
        batches = make_loader(train_set, int(batch_size or hp.get("batch_size", 256)), shuffle=False,
                              num_workers=int(hp.get("num_workers", 0)))
    else:
        batches = datamodule.train_dataloader()
    k = int(components or model.hparams.gmm_components)
    fit = model.fit_prior(batches, components=k, max_samples=max_samples)

    settings = {"sampling_prior": "gmm", "gmm_components": len(fit.weights)}
    if max_samples is not None:
        settings["gmm_max_samples"] = int(max_samples)
    checkpoint["state_dict"] = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    extras = dict(checkpoint.get(CONFIG_KEY) or {})
    extras["model"] = {**model_cfg, **settings}
    extras["data"] = data_cfg  # the new checkpoint is self-contained wherever it is written
    checkpoint[CONFIG_KEY] = extras
    if isinstance(checkpoint.get("hyper_parameters"), dict):
        checkpoint["hyper_parameters"].update(settings)

    target = Path(out).expanduser() if out else default_out(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, target)  # never a half-written checkpoint, also when overwriting the input
    log.info("wrote %s (%d components, mean log-likelihood %.3f nats; N(0, I): %.3f)", target, len(fit.weights),
             fit.mean_log_likelihood, fit.standard_log_likelihood)
    return {"out": str(target), "components": len(fit.weights), "num_samples": fit.num_samples,
            "mean_log_likelihood": fit.mean_log_likelihood, "standard_log_likelihood": fit.standard_log_likelihood,
            "converged": fit.converged}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a VAE checkpoint (e.g. <run>/checkpoints/last.ckpt)")
    parser.add_argument("--components", type=int, default=None,
                        help="mixture components k (default: the checkpoint's gmm_components, else 10)")
    parser.add_argument("--out", default=None, help="new checkpoint (default: <ckpt stem>_gmm.ckpt beside it)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="training images encoded at most (default: the checkpoint's gmm_max_samples, 60000)")
    parser.add_argument("--data-dir", default=None, help="data_dir for the stored data config (default: stored)")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default: stored)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | ... (default: cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = upgrade_checkpoint(args.ckpt, args.out, args.components, args.max_samples, args.data_dir,
                                args.device, args.batch_size)
    print(result["out"])
    return result


if __name__ == "__main__":
    main()
