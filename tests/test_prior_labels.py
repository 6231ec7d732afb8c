"""Sampling a class-conditional model with the training split's class frequencies (``label_distribution=prior``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from atelier.data.label_counts import train_label_counts
from atelier.sampling.guidance import prior_labels
from atelier.tasks import evaluate, train
from atelier.tasks.evaluate import evaluation_labels
from tests.conftest import ROOT
from tests.test_evaluate import TINY_RUN, classifier_ckpt, eval_cfg  # noqa: F401  (classifier_ckpt: a fixture)


class Labelled(Dataset):
    """``targets`` as torchvision's datasets keep them; items ``(index, label)``."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, self.targets[i]


def test_prior_labels_follow_the_counts_by_largest_remainder() -> None:
    labels = prior_labels(8, torch.tensor([1, 3]))
    assert labels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # 10 / 3 each: quotas 3, 3, 3 and the one left goes to the first of the equal remainders
    assert torch.bincount(prior_labels(10, torch.tensor([5, 5, 5]))).tolist() == [4, 3, 3]
    # a class with no training images gets no samples; quotas always sum to n
    counts = torch.tensor([0, 7, 2, 1])
    drawn = prior_labels(1001, counts)
    assert drawn.numel() == 1001 and drawn.dtype == torch.int64
    share = torch.bincount(drawn, minlength=4).double() / 1001
    assert share[0] == 0 and torch.allclose(share, counts.double() / 10, atol=1 / 1001)
    for bad in (torch.tensor([0, 0]), torch.tensor([1, -1]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="class_counts"):
            prior_labels(4, bad)


def test_train_label_counts_reads_targets_through_nested_subsets() -> None:
    full = Labelled([0, 1, 1, 2, 2, 2, 0, 1])
    inner = Subset(full, [1, 2, 3, 4, 5, 7])  # labels 1, 1, 2, 2, 2, 1
    outer = Subset(inner, [0, 2, 3])          # labels 1, 2, 2
    expected = torch.bincount(torch.tensor([outer[i][1] for i in range(len(outer))]), minlength=3)
    assert train_label_counts(SimpleNamespace(train_set=outer), 3).tolist() == expected.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 2\)"):
        train_label_counts(SimpleNamespace(train_set=outer), 2)
    with pytest.raises(ValueError, match="has no targets; use label_distribution=balanced"):
        train_label_counts(SimpleNamespace(train_set=Subset([(0, 0)], [0])), 3)
    with pytest.raises(ValueError, match=r"label_distribution='uniform': allowed values are \['balanced', 'prior'\]"):
        evaluation_labels("uniform", 4, 3, SimpleNamespace(train_set=outer))


@pytest.mark.slow
def test_evaluate_samples_a_conditional_model_with_the_training_prior(
        train_cfg: Callable[..., DictConfig], tmp_path: Path, classifier_ckpt: Path,  # noqa: F811
        mnist_available, monkeypatch: pytest.MonkeyPatch) -> None:
    train.run(train_cfg(*TINY_RUN, "model.num_classes=10", "callbacks.sample_grid=null"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    datamodule = evaluate.reference_datamodule(ckpt)
    counts = train_label_counts(datamodule, 10)
    assert int(counts.sum()) == len(datamodule.train_set) and int(counts.min()) > 0
    assert int(counts.argmax()) == 1  # MNIST has more 1s than any other digit
    drawn: list[torch.Tensor] = []

    def spy(*args: object) -> torch.Tensor:
        drawn.append(evaluation_labels(*args))  # type: ignore[arg-type]
        return drawn[-1]

    monkeypatch.setattr(evaluate, "evaluation_labels", spy)
    n = 200
    result = evaluate.run(eval_cfg(ckpt, tmp_path, classifier_ckpt, "num_inference_steps=2", "metrics=[fid]",
                                   f"num_samples={n}", "label_distribution=prior"))
    assert result["protocol"]["sampling"]["label_distribution"] == "prior"
    assert len(drawn) == 1 and drawn[0].tolist() == prior_labels(n, counts).tolist()
    per_class = torch.bincount(drawn[0], minlength=10)
    assert int(per_class.argmax()) == 1 and int(per_class.max()) > n // 10  # not balanced
    assert 0.0 <= result["metrics"]["cond_accuracy"] <= 1.0

    # the sweep scripts take the same choice (--label-distribution), through the same helper
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import guidance_sweep

    from atelier.metrics.evaluator import Evaluator

    asked: list[torch.Tensor] = []
    real_evaluate = Evaluator.evaluate

    def record(self: Evaluator, model: torch.nn.Module, options: dict) -> dict:
        asked.append(options["labels"])
        return real_evaluate(self, model, options)

    monkeypatch.setattr(Evaluator, "evaluate", record)
    out = tmp_path / "sweep"
    rows = guidance_sweep.main([str(ckpt), "--scales", "1", "--steps", "2", "--num-samples", "50", "--metrics", "fid",
                                "--classifier-ckpt", str(classifier_ckpt), "--cache-dir", str(tmp_path / "stats"),
                                "--label-distribution", "prior", "--out", str(out)])
    assert len(rows) == 1 and 0.0 <= rows[0]["cond_accuracy"] <= 1.0
    assert len(asked) == 1 and asked[0].tolist() == prior_labels(50, counts).tolist()
    record_json = json.loads((out / "guidance_sweep.json").read_text())
    assert record_json["protocol"]["sampling"]["label_distribution"] == "prior"


def test_label_choice_follows_the_command_line_then_the_recipe(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from atelier.callbacks.checkpoint_extras import CONFIG_KEY
    from atelier.tasks.sample import label_choice

    recipe, plain = tmp_path / "recipe.ckpt", tmp_path / "plain.ckpt"
    torch.save({CONFIG_KEY: {"sampling": {"label_distribution": "prior"}}}, recipe)
    torch.save({CONFIG_KEY: {"sampling": None}}, plain)
    cfg = lambda path, choice: OmegaConf.create({"ckpt_path": str(path), "label_distribution": choice})  # noqa: E731
    assert label_choice(cfg(recipe, None)) == "prior"  # the recipe's default (ddpm_kmeans_mnist_cpu)
    assert label_choice(cfg(recipe, "balanced")) == "balanced"  # the command line wins
    assert label_choice(cfg(plain, None)) == "balanced"  # no recipe default
    assert label_choice(cfg(plain, "prior")) == "prior"


def test_checkpoints_store_the_training_label_counts_of_conditional_models() -> None:
    from atelier.callbacks.checkpoint_extras import CheckpointExtras
    from atelier.data.label_counts import LABEL_COUNTS_KEY, stored_label_counts

    datamodule = SimpleNamespace(train_set=Subset(Labelled([0, 1, 1, 2, 2, 2, 0, 1]), [1, 2, 3, 4, 5]))
    trainer = SimpleNamespace(datamodule=datamodule)
    extras = CheckpointExtras({"model": {}})
    checkpoint: dict = {}
    extras.on_save_checkpoint(trainer, SimpleNamespace(num_classes=4), checkpoint)  # type: ignore[arg-type]
    assert checkpoint[LABEL_COUNTS_KEY].tolist() == [0, 2, 3, 0]  # labels 1, 1, 2, 2, 2 of 4 classes
    assert stored_label_counts(checkpoint).dtype == torch.int64
    no_targets = SimpleNamespace(train_set=Subset([(0, 0)], [0]))
    for module, dm in ((SimpleNamespace(num_classes=None), datamodule), (SimpleNamespace(num_classes=3), no_targets)):
        checkpoint = {}
        trainer = SimpleNamespace(datamodule=dm)
        CheckpointExtras({}).on_save_checkpoint(trainer, module, checkpoint)  # type: ignore[arg-type]
        assert LABEL_COUNTS_KEY not in checkpoint and stored_label_counts(checkpoint) is None
