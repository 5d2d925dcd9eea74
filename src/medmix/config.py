"""The training recipes: one place for every setting's default, type, choices and help text. ``medmix train``
builds its options from these fields (``cli._train_options``), :func:`medmix.train` and
:func:`medmix.train_generalist` take them as keywords, and a run stores them in ``config.json``. Torch-free, so the
command line's ``--help`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIZES = (28, 64, 128, 224)
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adam", "adamw", "sgd")
TEACHER_VIEWS = ("teacher", "identity")
AUGMENTS = ("none", "radiology", "ultrasound", "rotation_free", "rotate_flip_zoom", "medvit_paper",
            "radiology_strong", "ultrasound_strong", "fundus_strong", "ct_mri_strong")


def opt(default: Any = None, help: str = "", *, type: Any = None, choices: tuple | None = None,  # noqa: A002
        cli: bool = True, factory: Any = None, flag: str | None = None) -> Any:
    """A config field with what the command line needs: ``help`` (the default is appended unless the text says
    it), ``type`` (for ``X | None`` fields), ``choices``, ``cli=False`` for fields with no option, and ``flag`` for a
    boolean whose option turns it off (``--no-ood``)."""
    meta = {"help": help, "type": type, "choices": choices, "cli": cli, "flag": flag}
    return field(default=default, metadata=meta) if factory is None else field(default_factory=factory, metadata=meta)


@dataclass
class RecipeConfig:
    """The training recipe shared by single-dataset runs (:class:`TrainConfig`) and generalists
    (:class:`GeneralistConfig`)."""
    data_dir: str | None = opt(None, "folder with the dataset files (default $MEDMIX_DATA, else medmnist's "
                                     "~/.medmnist)", type=str)
    size: int = opt(28, "which MedMNIST file to read ({flag}.npz for 28, {flag}_{size}.npz otherwise); other "
                        "datasets are read at their stored size", choices=SIZES)
    img_size: int | None = opt(None, "model input side (default: the stored image size; several datasets: the "
                                     "smallest)", type=int)
    model: str = opt("hybrid_mixer_small", "model name (see `medmix models`)")
    epochs: int = opt(30, "training epochs (passes over the training split)")
    batch_size: int = opt(128, "images per step (the global batch under torchrun)")
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.0, "weight decay of the optimiser")
    optimizer: str = opt("adam", "adam, adamw (decoupled weight decay) or sgd (Nesterov momentum 0.9)",
                         choices=OPTIMIZERS)
    schedule: str = opt("cosine", "learning-rate schedule per step: cosine (after --warmup-epochs), step (x0.1 at "
                                  "50 %% and 75 %% of training, the official MedMNIST recipe) or none",
                        choices=("cosine", "step", "none"))
    warmup_epochs: float = opt(1.0, "linear warm-up of the cosine schedule, in epochs")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy, 0..1")
    drop_rate: float = opt(0.0, "dropout before the classifier, 0..1")
    drop_path_rate: float | None = opt(None, "stochastic depth (default: the model's own: 0 for the CNNs, "
                                             "0.1/0.2 for MedViT S/B/L)", type=float)
    ema: float | None = opt(None, "keep an exponential moving average of the weights, this decay per step at most "
                                  "(e.g. 0.999; timm's ModelEmaV3 with its warm-up, so short runs average over "
                                  "fewer steps), and validate, keep and test it as the model (default: off)",
                            type=float)
    patience: int = opt(10, "early stopping: epochs without val improvement")
    precision: str = opt("auto", "auto: bf16 autocast where the CPU has native bf16, else fp32", choices=PRECISIONS)
    seed: int = opt(0, "random seed of the split, initialisation, data order and augmentation")
    split_seed: int | None = opt(None, "seed of the train/val/test split of a class-folder or packed dataset "
                                       "(default: --seed); give several seeds' runs one split seed to ensemble them "
                                       "(MedMNIST files have official splits)", type=int)
    out: str | None = opt(None, "run directory (default runs/<dataset>-<model>-s<seed>-<time>)", type=str)
    overwrite: bool = opt(False, "replace an existing run directory")
    download: bool = opt(False, "download a missing MedMNIST file (needs internet)")
    eval_batch_size: int = opt(512, "images per evaluation batch", cli=False)
    normalize: str = opt("dataset", "input normalisation: dataset (mean/std of the training images) or half "
                                    "(mean .5, std .5, as the official MedMNIST experiments)",
                         choices=("dataset", "half"))
    bn_recalibrate: bool = opt(True, "keep the BatchNorm statistics gathered on augmented images (default: "
                                     "re-estimate them on clean training images at the end)", flag="no-bn-recalibrate")
    calibrate: bool = opt(True, "do not fit the confidence temperature on the validation split at the end "
                                "(default: fit it; `medmix calibrate RUN` can do it later)", flag="no-calibrate")
    ood: bool = opt(True, "do not fit the out-of-distribution statistics and threshold at the end (default: fit "
                          "them, so predictions carry in_distribution and ood_score)", flag="no-ood")
    quiet: bool = opt(False, "no progress bars or per-epoch lines")
    model_kwargs: dict = opt(help="extra keyword arguments of the model builder", cli=False, factory=dict)
    resume: str | bool | None = opt(None, "continue a run killed mid-way (its directory or <dir>.partial) or a "
                                          "finished one with more --epochs; without RUN_DIR: continue --out if it "
                                          "holds a run, else start it (default: a new run)")
    ddp: bool | None = opt(None, "data-parallel training in processes started by torchrun (automatic when "
                                 "torchrun starts more than one): torchrun --nproc_per_node=N -m medmix train ...")


@dataclass
class TrainConfig(RecipeConfig):
    """One dataset (:func:`medmix.train`)."""
    dataset: str = opt("breastmnist", "a dataset name (see `medmix datasets`), a class-folder directory or an npz "
                                      "file; several, comma-separated, train one generalist model with a head per "
                                      "dataset and a modality router (medmix.generalist); required unless --resume "
                                      "RUN_DIR", cli=False)
    loss: str | None = opt(None, "training loss (default: ce for single-label tasks, bce for multi-label)",
                           type=str, choices=("ce", "nll", "bce", "ordinal", "corn"))
    alpha: float = opt(0.2, "ordinal loss: weight of the rank loss, 0..1")
    margin: float = opt(0.1, "ordinal loss: ranking margin")
    ordinal_variant: str = opt("peaked", "ordinal loss: peaked (the rank loss points at the true grade) or printed "
                                         "(the formula exactly as printed in the Ordinal Loss paper, for comparison)",
                               choices=("peaked", "printed"))
    augment: str | None = opt(None, "augmentation policy: " + ", ".join(AUGMENTS) + " (default: chosen by dataset)",
                              type=str)
    mixup: float = opt(0.0, "mixup: blend each training image with another, weight ~ Beta(a, a) with this a "
                            "(e.g. 0.2; 0 = off); the loss is the same blend of both images' losses")
    cutmix: float = opt(0.0, "CutMix: paste a box of another training image, its area ~ Beta(a, a) with this a "
                             "(e.g. 1.0; 0 = off); with --mixup too, each mixed batch uses one of the two")
    mix_prob: float = opt(1.0, "share of training batches mixed when --mixup or --cutmix is on, 0..1")
    corrupt: float = opt(0.0, "augmentation with the MedMNIST-C corruptions of the dataset's modality "
                              "(medmix.corruptions): each training image is corrupted with this probability by one "
                              "corruption drawn at random at a random severity 1-5 (0 = off)")
    teacher: str | None = opt(None, "distil from this run or ensemble of the same dataset (`medmix ensemble`): the "
                                    "loss adds the teacher's soft labels on every augmented batch (default: none)",
                                type=str)
    distill_weight: float = opt(0.5, "--teacher: weight of the soft-label term, 0..1 (the hard labels get the rest)")
    distill_temperature: float = opt(2.0, "--teacher: softening temperature of the soft labels")
    teacher_views: str = opt("teacher", "--teacher: the test-time views behind the soft labels: teacher = those the "
                                        "teacher was built with (an ensemble's --tta), identity = none (cheaper: "
                                        "the shift view costs four passes per member and step)",
                             choices=TEACHER_VIEWS)
    monitor: str = opt("auto", "validation metric that picks the best epoch (auto: AUC for binary/multi-label, else "
                               "ACC)", choices=("auto", "acc", "auc", "loss", "f1"))
    tune_threshold: bool = opt(False, "multi-label: choose each label's decision threshold on the validation split")


@dataclass
class GeneralistConfig(RecipeConfig):
    """Several datasets, one model with a head per dataset and a modality router (:func:`medmix.train_generalist`)."""
    datasets: tuple[str, ...] = opt(("pneumoniamnist", "breastmnist"), "the datasets", cli=False)
    channels: int | None = opt(None, "common channel count (default: 3, grayscale replicated, when any dataset is in "
                                     "colour)", type=int, choices=(1, 3))
    steps_per_epoch: int | None = opt(None, "batches between validations (default: one pass over the pooled "
                                            "training images)", type=int)
    sampling_temperature: float = opt(2.0, "batches draw dataset d with probability proportional to n_d^(1/T): 1 = "
                                           "by size, inf = equally")
    modality_weight: float = opt(1.0, "weight of the modality router's loss")
