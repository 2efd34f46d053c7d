"""Every paper sweep runs the experiment its paper ran: each run of each sweep is composed as
launcher/train.py composes it, and what a dry run prints of it (memetrain/sweep/plan.py: the weights it
starts from, the recipe in effect) is checked against the values in the paper's code, row by row below,
each row citing its source. Epochs are in steps of the reference loaders (8500 Hateful Memes training
memes: 531 steps at batch 16, 265 at 32, 132 at 64 with DINO's drop_last; 212 and 225 steps at batch 40
on Hateful Memes and MAMI's 9000 after the dev carve)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from memetrain.cli import CONFIG_DIR
from memetrain.sweep.grid import expand
from memetrain.sweep.plan import compose_run, describe_run, recipe_values
from tests.helpers import REPO

CASS = "pranavsinghps1/CASS CASS.ipynb"
DINO = "facebookresearch/dino"
SIMPLE = "moein-shariatnia/OpenAI-CLIP"
SEMI = "FPTU-Thesis-CSAI/SemiMemes"
HC = "gokulkarthik/hateclipper"
TIB = "TIBHannover/multimodal-misogyny-detection-mami-2022 train_multitask.py"
MMF = "facebookresearch/mmf"
CASS_SCHEDULE = {"kind": "cosine_annealing", "t_max": 16}

# (sweep, job's method label, run: "pretrain" or "train", key, value, source)
PAPER = [
    # -- tables 1 and 2: CASS --------------------------------------------------------------------
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "weights.cnn",
        "resnet50: timm default tag",
        f"{CASS} 68, 338: timm resnet50 pretrained=True",
    ),
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "weights.vit",
        "vit_base_patch16_384: timm default tag",
        f"{CASS} 69, 339",
    ),
    ("table1", "cass-resnet50", "pretrain", "trainer.optimizer", "adam", f"{CASS} 383-384: torch.optim.Adam"),
    ("table1", "cass-resnet50", "pretrain", "trainer.lr", 1e-3, f"{CASS} 383-384: lr 1e-3"),
    ("table1", "cass-resnet50", "pretrain", "trainer.weight_decay", 0.0, f"{CASS} 383-384: no weight decay"),
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "trainer.lr_schedule",
        CASS_SCHEDULE,
        f"{CASS} 385-390, 370: CosineAnnealingLR(T_max=16) per batch",
    ),
    ("table1", "cass-resnet50", "pretrain", "trainer.min_lr", 1e-6, f"{CASS} 387: eta_min 1e-6"),
    ("table1", "cass-resnet50", "pretrain", "trainer.warmup_steps", 0, f"{CASS} 385-390: no warmup"),
    ("table1", "cass-resnet50", "pretrain", "data.batch_size", 16, f"{CASS} 72: batch_size 16"),
    ("table1", "cass-resnet50", "pretrain", "trainer.max_steps", 100 * 531, f"{CASS} 460: num_epochs=100"),
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "method.variance_weight",
        0.0,
        f"{CASS} 402-405: 2 - 2 cos alone",
    ),
    ("table1", "cass-resnet50", "pretrain", "method.view.name", "cass", f"{CASS} 108-112: train_transform"),
    ("table1", "cass-resnet50", "train", "trainer.lr", 3e-4, f"{CASS} 489: fine-tuning Adam lr 3e-4"),
    (
        "table1",
        "cass-resnet50",
        "train",
        "trainer.lr_schedule",
        CASS_SCHEDULE,
        f"{CASS} 490: T_max=cfg.t_max 16",
    ),
    ("table1", "cass-resnet50", "train", "trainer.max_steps", 50 * 531, f"{CASS} 497: 50 epochs"),
    (
        "table1",
        "cass-resnet50",
        "train",
        "weights.image",
        "resnet50: <pretrain> [encoders.cnn.]",
        "the pretrained CNN",
    ),
    (
        "table1",
        "supervised-resnet50",
        "train",
        "weights.image",
        "resnet50: timm default tag",
        f"{CASS} 338: the same ImageNet weights",
    ),
    ("table1", "supervised-resnet50", "train", "trainer.lr", 3e-4, f"{CASS} 489"),
    (
        "table2",
        "cass-vit_b16",
        "train",
        "weights.image",
        "vit_base_patch16_384: <pretrain> [encoders.vit.]",
        f"{CASS} 561-573: the ViT fine-tuned",
    ),
    (
        "table2",
        "supervised-vit_b16",
        "train",
        "weights.image",
        "vit_base_patch16_384: timm default tag",
        f"{CASS} 69, 339",
    ),
    ("table2", "supervised-vit_b16", "train", "trainer.lr", 3e-4, f"{CASS} 564"),
    # -- tables 1 and 2: DINO (facebookresearch/dino @7c446df) -------------------------------------
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.optimizer",
        "sgd",
        f"{DINO} README.md 207: --optimizer sgd",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.momentum",
        0.9,
        f"{DINO} main_dino.py 229: SGD momentum 0.9",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.lr",
        0.03 * 64 / 256,
        f"{DINO} README.md 207 --lr 0.03; main_dino.py 239 x batch/256",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.weight_decay",
        1e-4,
        f"{DINO} README.md 207 --weight_decay 1e-4",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.weight_decay_end",
        1e-4,
        f"{DINO} README.md 207 --weight_decay_end 1e-4",
    ),
    ("table1", "dino-resnet50", "pretrain", "method.view.global_scale", [0.14, 1.0], f"{DINO} README.md 207"),
    ("table1", "dino-resnet50", "pretrain", "method.view.local_scale", [0.05, 0.14], f"{DINO} README.md 207"),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "method.drop_path_rate",
        0.0,
        f"{DINO} main_dino.py 175-178: torchvision ResNets",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "data.batch_size",
        64,
        f"{DINO} main_dino.py 90: batch_size_per_gpu 64",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.max_steps",
        100 * 132,
        f"{DINO} main_dino.py 92: 100 epochs",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.warmup_steps",
        10 * 132,
        f"{DINO} main_dino.py 99: warmup_epochs 10",
    ),
    ("table1", "dino-resnet50", "pretrain", "trainer.min_lr", 1e-6, f"{DINO} main_dino.py 101"),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "trainer.grad_clip",
        3.0,
        f"{DINO} main_dino.py 87: clip_grad 3.0",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "method.grad_clip_mode",
        "per_parameter",
        f"{DINO} utils.py 132-141",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "method.freeze_last_layer_steps",
        132,
        f"{DINO} main_dino.py 93: 1 epoch",
    ),
    ("table1", "dino-resnet50", "pretrain", "method.view.local_crops", 8, f"{DINO} main_dino.py 112"),
    ("table1", "dino-resnet50", "pretrain", "method.view.local_size", 96, f"{DINO} main_dino.py 452"),
    ("table1", "dino-resnet50", "pretrain", "method.view.flip_p", 0.5, f"{DINO} main_dino.py 422"),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "method.view.blur",
        [1.0, 0.1, 0.5],
        f"{DINO} main_dino.py 438, 445, 454",
    ),
    (
        "table1",
        "dino-resnet50",
        "pretrain",
        "method.view.solarize",
        [0.0, 0.2, 0.0],
        f"{DINO} main_dino.py 446",
    ),
    ("table1", "dino-resnet50", "pretrain", "method.out_dim", 65536, f"{DINO} main_dino.py 55"),
    ("table1", "dino-resnet50", "pretrain", "method.use_bn_in_head", False, f"{DINO} main_dino.py 64"),
    ("table1", "dino-resnet50", "pretrain", "method.teacher_temp", 0.04, f"{DINO} main_dino.py 71"),
    ("table1", "dino-resnet50", "pretrain", "method.teacher_temp_warmup_steps", 0, f"{DINO} main_dino.py 74"),
    ("table1", "dino-resnet50", "pretrain", "method.teacher_momentum", 0.996, f"{DINO} main_dino.py 61"),
    (
        "table1",
        "dino-resnet50",
        "train",
        "weights.image",
        "resnet50: <pretrain> [teacher.backbone.]",
        "the teacher's backbone",
    ),
    ("table2", "dino-vit_b16", "pretrain", "trainer.optimizer", "adamw", f"{DINO} main_dino.py 103, 227"),
    ("table2", "dino-vit_b16", "pretrain", "trainer.lr", 5e-4 * 64 / 256, f"{DINO} main_dino.py 96, 239"),
    ("table2", "dino-vit_b16", "pretrain", "trainer.weight_decay", 0.04, f"{DINO} main_dino.py 82"),
    ("table2", "dino-vit_b16", "pretrain", "trainer.weight_decay_end", 0.4, f"{DINO} main_dino.py 84"),
    ("table2", "dino-vit_b16", "pretrain", "method.drop_path_rate", 0.1, f"{DINO} main_dino.py 105, 164"),
    (
        "table2",
        "dino-vit_b16",
        "pretrain",
        "method.view.global_scale",
        [0.4, 1.0],
        f"{DINO} main_dino.py 108",
    ),
    (
        "table2",
        "dino-vit_b16",
        "pretrain",
        "method.view.local_scale",
        [0.05, 0.4],
        f"{DINO} main_dino.py 115",
    ),
    ("table2", "dino-vit_b16", "pretrain", "method.norm_last_layer", True, f"{DINO} main_dino.py 57-60"),
    (
        "table2",
        "dino-vit_b16",
        "pretrain",
        "method.grad_clip_mode",
        "per_parameter",
        f"{DINO} utils.py 132-141",
    ),
    (
        "table2",
        "dino-vit_b16",
        "pretrain",
        "weights.image",
        "vit_base_patch16_384: timm default tag",
        f"{CASS} 69, 339",
    ),
    # -- the resize filter and what CASS compares: each reference's own ------------------------------
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "data.interpolation",
        "bilinear",
        f"{CASS} 108, 116: tsfm.Resize default",
    ),
    (
        "table1",
        "cass-resnet50",
        "pretrain",
        "method.compare",
        "classifier",
        f"{CASS} 338-339, 363-365: ImageNet logits",
    ),
    ("table2", "cass-vit_b16", "pretrain", "method.compare", "classifier", f"{CASS} 338-339, 363-365"),
    ("table2", "supervised-vit_b16", "train", "data.interpolation", "bilinear", f"{CASS} 108, 116"),
    (
        "table2",
        "dino-vit_b16",
        "pretrain",
        "data.interpolation",
        "bicubic",
        f"{DINO} main_dino.py 436, 443, 452",
    ),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "data.interpolation",
        "bilinear",
        f"{SIMPLE} notebook 322, 329: A.Resize",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "data.interpolation",
        "bicubic",
        f"{SEMI} semi_supervised_data.py 91",
    ),
    # -- table 3: the simple CLIP and CASS-MM --------------------------------------------------------
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "trainer.lr_schedule",
        {"kind": "plateau", "metric": "loss", "patience": 1, "factor": 0.8},
        f"{SIMPLE} notebook 158-159, 811-812, 830: ReduceLROnPlateau on the validation loss",
    ),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "trainer.val_every",
        265,
        f"{SIMPLE} notebook 821-830: once an epoch",
    ),
    ("table3", "clip-vit_b16", "pretrain", "method.loss", "soft_targets", f"{SIMPLE} CLIP.py 33-43"),
    ("table3", "clip-vit_b16", "pretrain", "method.temperature", 1.0, f"{SIMPLE} notebook 172"),
    ("table3", "clip-vit_b16", "pretrain", "method.projection", "residual", f"{SIMPLE} modules.py 48-69"),
    ("table3", "clip-vit_b16", "pretrain", "method.projection_dropout", 0.1, f"{SIMPLE} notebook 180"),
    ("table3", "clip-vit_b16", "pretrain", "method.embed_dim", 256, f"{SIMPLE} notebook 179"),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "method.lr_scales.image_encoder",
        0.1,
        f"{SIMPLE} notebook 155, 804: 1e-4 = 0.1 x 1e-3",
    ),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "method.lr_scales.text_encoder",
        0.01,
        f"{SIMPLE} notebook 156, 805: 1e-5",
    ),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "method.lr_scales.heads",
        1.0,
        f"{SIMPLE} notebook 154, 808: 1e-3",
    ),
    ("table3", "clip-vit_b16", "pretrain", "trainer.lr", 1e-3, f"{SIMPLE} notebook 154: head_lr"),
    ("table3", "clip-vit_b16", "pretrain", "trainer.weight_decay", 1e-3, f"{SIMPLE} notebook 157, 808"),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "trainer.betas",
        [0.9, 0.999],
        f"{SIMPLE} notebook 810: AdamW defaults",
    ),
    ("table3", "clip-vit_b16", "pretrain", "data.batch_size", 32, f"{SIMPLE} notebook 152"),
    ("table3", "clip-vit_b16", "pretrain", "data.max_length", 200, f"{SIMPLE} notebook 168"),
    ("table3", "clip-vit_b16", "pretrain", "trainer.max_steps", 4 * 265, f"{SIMPLE} notebook 160: 4 epochs"),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "weights.text",
        "transformer: distilbert-base-uncased",
        f"{SIMPLE} notebook 165, 170",
    ),
    (
        "table3",
        "clip-vit_b16",
        "pretrain",
        "weights.image",
        "vit_base_patch16_384: timm default tag",
        "the study's ViT-B/16 at 384 px",
    ),
    (
        "table3",
        "clip-resnet50",
        "pretrain",
        "weights.image",
        "resnet50: timm default tag",
        f"{SIMPLE} notebook 163, 170",
    ),
    ("table3", "cass_mm-vit_b16", "pretrain", "method.variance_weight", 0.0, f"{CASS} 402-405"),
    ("table3", "cass_mm-vit_b16", "pretrain", "trainer.lr", 1e-3, f"{CASS} 383-384"),
    ("table3", "cass_mm-resnet50", "pretrain", "weights.cnn", "resnet50: timm default tag", f"{CASS} 338"),
    # -- SemiMemes on Hateful Memes ---------------------------------------------------------------
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "weights.clip",
        "open_clip ViT-L-14 <- openai",
        f"{SEMI} src/clip_feature_extractor.py 72-75; clip_info.py",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "method.features",
        "raw",
        f"{SEMI} src/clip_feature_extractor.py 24-28",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "method.autoencoder",
        "semimemes",
        f"{SEMI} src/model/AutoEncoder.py 4-32",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "method.classifier",
        "branches",
        f"{SEMI} src/model/AutoEncoder.py 34-82",
    ),
    ("semimemes", "semimemes-5pct", "train", "method.branch_dim", 256, f"{SEMI} src/model/AutoEncoder.py 38"),
    ("semimemes", "semimemes-5pct", "train", "method.dropout", 0.2, f"{SEMI} src/model/AutoEncoder.py 44-47"),
    ("semimemes", "semimemes-5pct", "train", "method.loss", "resample", f"{SEMI} scripts/ours_0.05.sh"),
    ("semimemes", "semimemes-5pct", "train", "autoencoder.optimizer", "adam", f"{SEMI} src/pretrain.py 12"),
    ("semimemes", "semimemes-5pct", "train", "autoencoder.lr", 2e-4, f"{SEMI} src/pretrain.py 12"),
    ("semimemes", "semimemes-5pct", "train", "autoencoder.weight_decay", 1e-4, f"{SEMI} src/pretrain.py 12"),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "autoencoder.lr_schedule",
        {"kind": "step", "step_every": 212, "gamma": 0.95},
        f"{SEMI} src/pretrain.py 14, 44",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "autoencoder.max_steps",
        100 * 212,
        f"{SEMI} src/train_2_stages.py 432: 100 epochs",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "trainer.optimizer",
        "adam",
        f"{SEMI} scripts/ours_0.05.sh --use-adam",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "trainer.lr",
        1e-4,
        f"{SEMI} scripts/ours_0.05.sh --lr-supervise",
    ),
    ("semimemes", "semimemes-5pct", "train", "trainer.weight_decay", 0.0, f"{SEMI} src/arguments.py 128"),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "data.batch_size",
        40,
        f"{SEMI} scripts/ours_0.05.sh --batchsize 40",
    ),
    (
        "semimemes",
        "semimemes-5pct",
        "train",
        "trainer.lr_schedule",
        {"kind": "step", "step_every": 11, "gamma": 0.93},
        f"{SEMI} config/0.05label.yaml step_lr_gamma",
    ),
    (
        "semimemes",
        "semimemes-10pct",
        "train",
        "trainer.lr_schedule",
        {"kind": "step", "step_every": 22, "gamma": 0.9},
        f"{SEMI} config/0.1label.yaml",
    ),
    (
        "semimemes",
        "semimemes-30pct",
        "train",
        "trainer.lr_schedule",
        {"kind": "step", "step_every": 64, "gamma": 0.85},
        f"{SEMI} config/0.3label.yaml",
    ),
    (
        "semimemes",
        "semimemes-30pct",
        "train",
        "trainer.max_steps",
        50 * 64,
        f"{SEMI} config/0.3label.yaml finetune_epochs 50",
    ),
    ("semimemes", "semimemes-30pct", "train", "data.label_fraction", 0.3, f"{SEMI} config/0.3label.yaml"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "method.fusion", "cross", f"{HC} run.sh"),
    (
        "semimemes",
        "hate_clipper-cross-5pct",
        "train",
        "method.features",
        "pooled",
        f"{HC} engine.py 172, 182",
    ),
    ("semimemes", "hate_clipper-cross-5pct", "train", "method.map_dim", 32, f"{HC} run.sh --map_dim 32"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "method.drop_probs", [0.2, 0.4, 0.1], f"{HC} run.sh"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "trainer.lr", 1e-4, f"{HC} run.sh --lr 0.0001"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "trainer.weight_decay", 1e-4, f"{HC} main.py 70"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "trainer.grad_clip", 0.1, f"{HC} main.py 71"),
    ("semimemes", "hate_clipper-cross-5pct", "train", "data.batch_size", 16, f"{HC} run.sh --batch_size 16"),
    (
        "semimemes",
        "hate_clipper-cross-5pct",
        "train",
        "weights.clip",
        "open_clip ViT-L-14 <- openai",
        f"{HC} run.sh",
    ),
    ("semimemes", "hate_clipper-align-5pct", "train", "method.fusion", "align", f"{HC} engine.py 197"),
    # -- SemiMemes on MAMI task B ---------------------------------------------------------------------
    (
        "semimemes_mami",
        "semimemes-5pct",
        "train",
        "data.targets",
        ["shaming", "stereotype", "objectification", "violence"],
        f"{SEMI} src/train_2_stages.py 371",
    ),
    (
        "semimemes_mami",
        "semimemes-5pct",
        "train",
        "data.dev_from_train",
        0.1,
        "MAMI has no dev split: a 10 % carve",
    ),
    (
        "semimemes_mami",
        "semimemes-5pct",
        "train",
        "autoencoder.max_steps",
        100 * 225,
        f"{SEMI} src/train_2_stages.py 432",
    ),
    ("semimemes_mami", "cmml-clip-5pct", "train", "method.fused_weight", 2.0, f"{SEMI} src/CmmlTrain.py 261"),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "method.diversity_weight",
        0.0,
        f"{SEMI} src/arguments.py 185",
    ),
    ("semimemes_mami", "cmml-clip-5pct", "train", "method.huber_delta", 1.003, f"{SEMI} src/CmmlTrain.py 50"),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "method.encoder",
        "linear",
        f"{SEMI} src/model/CmmlLayer.py 146-188",
    ),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "method.attention_hidden",
        [64, 32],
        f"{SEMI} src/arguments.py 223",
    ),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "method.prediction_vector",
        "sigmoid",
        f"{SEMI} src/loss.py 241-255",
    ),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "trainer.weight_decay",
        1e-4,
        f"{SEMI} scripts/cmml_clip_welltune_0.05.sh --wd 1e-4",
    ),
    (
        "semimemes_mami",
        "cmml-clip-5pct",
        "train",
        "trainer.lr_schedule",
        {"kind": "step", "step_every": 200, "gamma": 0.93},
        f"{SEMI} src/CmmlTrain.py 74",
    ),
    ("semimemes_mami", "tib-va-5pct", "train", "method.text", "lstm", f"{TIB} 47, 70"),
    ("semimemes_mami", "tib-va-5pct", "train", "trainer.betas", [0.99, 0.98], f"{TIB} 327"),
    ("semimemes_mami", "tib-va-5pct", "train", "trainer.lr", 1e-4, f"{TIB} 19"),
    ("semimemes_mami", "tib-va-5pct", "train", "trainer.weight_decay", 1e-4, f"{TIB} 327"),
    ("semimemes_mami", "tib-va-5pct", "train", "trainer.grad_clip", 1.0, f"{TIB} 153"),
    ("semimemes_mami", "tib-va-5pct", "train", "data.batch_size", 64, f"{TIB} 15"),
    (
        "semimemes_mami",
        "tib-va-5pct",
        "train",
        "trainer.lr_schedule",
        {"kind": "multistep", "milestones": [40, 80, 120], "gamma": 0.5},
        f"{TIB} 334: epochs 5, 10, 15 x 8 steps",
    ),
    # -- MAMI task A: MMBT as MMF runs it ------------------------------------------------------------
    ("mami", "mmbt", "train", "method.image_segment", 1, f"{MMF} mmf/models/mmbt.py MMBTBase.forward"),
    ("mami", "mmbt", "train", "method.head", "mmf", f"{MMF} mmf/models/mmbt.py MMBTForClassification"),
    (
        "mami",
        "mmbt",
        "train",
        "method.num_image_tokens",
        1,
        f"{MMF} configs/models/mmbt/defaults.yaml num_output_features 1",
    ),
    (
        "mami",
        "mmbt",
        "train",
        "weights.text",
        "transformer: bert-base-uncased",
        f"{MMF} configs/models/mmbt/defaults.yaml",
    ),
    (
        "mami",
        "mmbt",
        "train",
        "weights.image",
        "resnet152: tv_in1k",
        f"{MMF} configs/models/mmbt/defaults.yaml resnet152",
    ),
    ("mami", "mmbt", "train", "trainer.lr", 1e-5, f"{MMF} projects/mmbt/configs/hateful_memes/defaults.yaml"),
    (
        "mami",
        "mmbt",
        "train",
        "trainer.warmup_steps",
        2000,
        f"{MMF} projects/mmbt/configs/hateful_memes/defaults.yaml",
    ),
    (
        "mami",
        "mmbt",
        "train",
        "trainer.max_steps",
        22000,
        f"{MMF} projects/mmbt/configs/hateful_memes/defaults.yaml",
    ),
    (
        "mami",
        "mmbt",
        "train",
        "trainer.lr_schedule",
        {"kind": "warmup_linear"},
        f"{MMF} scheduler warmup_linear",
    ),
    ("mami", "mmbt", "train", "data.batch_size", 32, f"{MMF} training.batch_size 32"),
    (
        "mami",
        "clip-fusion",
        "train",
        "weights.clip",
        "open_clip ViT-L-14 <- openai",
        "frozen real CLIP features",
    ),
    # -- the course assignment's CLIP fusion on frozen real CLIP -------------------------------------
    (
        "assignment",
        "clip-fusion",
        "train",
        "weights.clip",
        "open_clip ViT-B-32-quickgelu <- openai",
        "frozen real CLIP features",
    ),
]
SWEEPS = sorted({row[0] for row in PAPER})


@functools.cache
def composed(sweep: str) -> dict[tuple[str, str], dict]:
    """(method label, run) -> recipe values of its first seed's job with the first axis value."""
    config = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/sweep/{sweep}.yaml"), resolve=False)
    values = {}
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for job in expand(config, [0]):
            for run, overrides in job.runs:
                key = (job.group["method"], "train" if run == "." else run)
                if key not in values:
                    values[key] = recipe_values(compose_run(overrides))
    return values


@pytest.mark.parametrize(
    ("sweep", "method", "run", "key", "value", "source"), PAPER, ids=lambda x: str(x)[:40]
)
def test_the_sweep_runs_the_papers_recipe(sweep, method, run, key, value, source):
    values = composed(sweep)[(method, run)]
    assert key in values, f"{sweep} {method} {run}: no {key} (source: {source})"
    got = values[key]
    if isinstance(value, float):
        assert got == pytest.approx(value), source
    else:
        assert got == value, source


def test_every_run_of_every_paper_sweep_composes_and_is_described():
    for sweep in SWEEPS:
        config = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/sweep/{sweep}.yaml"), resolve=False)
        runs = {(j.group["method"], r) for j in expand(config, [0]) for r, _ in j.runs}
        assert len(composed(sweep)) == len(runs), sweep
        for values in composed(sweep).values():
            assert any(k.startswith("weights.") for k in values) and "trainer.lr" in values


def test_describe_run_prints_weights_and_recipe():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        lines = describe_run(
            ["method=supervised", "model=resnet50", "model.image.pretrained=true", "trainer.lr=3e-4"]
        )
    assert lines[0] == "weights: image <- resnet50: timm default tag"
    assert lines[1].startswith("recipe: optimizer=adamw lr=0.0003 ")


@pytest.mark.slow
def test_a_dry_run_prints_each_runs_weights_and_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, "launcher/sweep.py", "+sweep=table1", "dry_run=true", f"root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "      weights: cnn <- resnet50: timm default tag; vit <- vit_base_patch16_384: timm default tag"
        in result.stdout
    )
    assert "recipe: optimizer=sgd lr=0.0075" in result.stdout
