"""The paper recipes: every value of each shipped ``*-imagenet.yaml`` and ``wav2vec2-base.yaml`` against
a table citing its source (paper and section or table, or the fairseq / mmpretrain config), and the
learning-rate schedules they name, against values computed by hand.

BN mode (``method.sync_bn`` / ``shuffle_bn``) is not in the table: the fields are being reworked
(issue 12, items 1 and 6) and are checked with them.
"""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.config import load_config, shipped_configs
from selfsup.core.objective import Progress
from selfsup.methods.momentum import cosine_momentum
from selfsup.train.optim import lr_at, scaled_lr, set_lr

SIMCLR = "SimCLR (Chen et al. 2020, arXiv 2002.05709)"
MOCO1 = "MoCo (He et al. 2020, arXiv 1911.05722)"
MOCO2 = "MoCo v2 (Chen et al. 2020, arXiv 2003.04297)"
MOCO3 = "MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057)"
MMPRE = "mmpretrain configs/mocov3/mocov3_resnet50_8xb512-amp-coslr-100e_in1k.py (+ imagenet_bs512_mocov3.py)"
BYOL = "BYOL (Grill et al. 2020, arXiv 2006.07733)"
SIMSIAM = "SimSiam (Chen & He 2021, arXiv 2011.10566)"
VICREG = "VICReg (Bardes, Ponce, LeCun 2022, arXiv 2105.04906)"
VICREG_CODE = "facebookresearch/vicreg main_vicreg.py"
VICREG_README = "facebookresearch/vicreg README (1000-epoch command: --epochs 1000 --batch-size 2048 --base-lr 0.2)"
VICREG_AUG = "facebookresearch/vicreg augmentations.py"
BARLOW = "Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230)"
BARLOW_CODE = "facebookresearch/barlowtwins main.py at its first release (f13c949)"
BARLOW_README = (
    "facebookresearch/barlowtwins README at f13c949 (--epochs 1000 --batch-size 2048 --learning-rate 0.2 "
    "--lambd 0.0051 --projector 8192-8192-8192 --scale-loss 0.024)"
)
DINO = "DINO (Caron et al. 2021, arXiv 2104.14294)"
DINO_CODE = "facebookresearch/dino main_dino.py (defaults)"
DINO_README = "facebookresearch/dino README, vanilla DINO training (8 GPUs, main_dino.py --arch vit_small)"
DINO_AUG = "facebookresearch/dino main_dino.py DataAugmentationDINO"
DINO_RN50 = "facebookresearch/dino README, ResNet-50 and other convnets (8 GPUs, main_dino.py --arch resnet50)"
W2V = "wav2vec 2.0 (Baevski et al. 2020, arXiv 2006.11477)"
FAIRSEQ = "fairseq examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml"


def _views(rows: list[tuple], *views: int) -> list[tuple]:
    """``rows`` of (field, value, source) for each of ``views``."""
    return [(f"views.{v}.{k}", val, src) for v in views for k, val, src in rows]


SIMCLR_AUG = [
    ("crop_scale", (0.08, 1.0), f"{SIMCLR} App. A (RandomResizedCrop 0.08-1)"),
    ("jitter_p", 0.8, f"{SIMCLR} App. A (colour distortion, strength s=1)"),
    ("brightness", 0.8, f"{SIMCLR} App. A (0.8s)"),
    ("contrast", 0.8, f"{SIMCLR} App. A (0.8s)"),
    ("saturation", 0.8, f"{SIMCLR} App. A (0.8s)"),
    ("hue", 0.2, f"{SIMCLR} App. A (0.2s)"),
    ("grayscale_p", 0.2, f"{SIMCLR} App. A"),
    ("blur_p", 0.5, f"{SIMCLR} App. A (blur on ImageNet, 50%)"),
    ("solarize_p", 0.0, f"{SIMCLR} App. A (no solarize)"),
]
MOCO2_AUG = [
    ("crop_scale", (0.2, 1.0), f"{MOCO1} §3.3 / {MOCO2} §3 (crops from 0.2)"),
    ("jitter_p", 0.8, f"{MOCO2} §3 (SimCLR's colour jitter, weaker)"),
    ("brightness", 0.4, MOCO2),
    ("contrast", 0.4, MOCO2),
    ("saturation", 0.4, MOCO2),
    ("hue", 0.1, MOCO2),
    ("grayscale_p", 0.2, MOCO2),
    ("blur_p", 0.5, f"{MOCO2} §3 (blur augmentation)"),
]
BYOL_AUG = [
    ("jitter_p", 0.8, f"{BYOL} Table 6"),
    ("brightness", 0.4, f"{BYOL} Table 6"),
    ("contrast", 0.4, f"{BYOL} Table 6"),
    ("saturation", 0.2, f"{BYOL} Table 6"),
    ("hue", 0.1, f"{BYOL} Table 6"),
    ("grayscale_p", 0.2, f"{BYOL} Table 6"),
    ("flip_p", 0.5, f"{BYOL} Table 6"),
]
BYOL_PAIR = [
    ("views.0.blur_p", 1.0, f"{BYOL} Table 6 (view 1)"),
    ("views.1.blur_p", 0.1, f"{BYOL} Table 6 (view 2)"),
    ("views.0.solarize_p", 0.0, f"{BYOL} Table 6 (view 1)"),
    ("views.1.solarize_p", 0.2, f"{BYOL} Table 6 (view 2)"),
]
MOCO3_COMMON = [
    ("method.momentum_base", 0.99, f"{MOCO3} §4 (m = 0.99, cosine to 1)"),
    ("method.proj_hidden_dim", 4096, f"{MOCO3} §4 (hidden layers 4096-d)"),
    ("method.proj_dim", 256, f"{MOCO3} §4 (outputs 256-d)"),
    ("method.pred_hidden_dim", 4096, f"{MOCO3} §4 (prediction MLP, 4096-d)"),
    ("optim.decay", "cosine", f"{MOCO3} §4 (cosine schedule)"),
]

RECIPES: dict[str, list[tuple]] = {
    "simclr-resnet50-imagenet": [
        ("batch", 4096, f"{SIMCLR} §2.3 (default setting: batch 4096)"),
        ("optim.name", "lars", f"{SIMCLR} §2.3 (LARS)"),
        ("optim.lr_scaling", "linear", f"{SIMCLR} §2.3 (lr = 0.3 x BatchSize/256)"),
        ("peak_lr", 4.8, f"{SIMCLR} §2.3 (lr 4.8 at batch 4096)"),
        ("optim.weight_decay", 1e-6, f"{SIMCLR} §2.3 (weight decay 1e-6)"),
        ("optim.warmup_epochs", 10, f"{SIMCLR} §2.3 (linear warm-up, 10 epochs)"),
        ("optim.decay", "cosine", f"{SIMCLR} §2.3 (cosine decay without restarts)"),
        ("optim.epochs", 1000, f"{SIMCLR} §6 (ResNet-50 trained 1000 epochs)"),
        ("method.temperature", 0.1, f"{SIMCLR} §5.1 Table 5 (tau 0.1 with l2 norm)"),
        ("method.proj_layers", 2, f"{SIMCLR} §2.1 (g: MLP with one hidden layer)"),
        ("method.proj_hidden_dim", 2048, f"{SIMCLR} §2.3 (hidden 2048)"),
        ("method.proj_dim", 128, f"{SIMCLR} §2.3 / Fig. 8 (128-d output)"),
        *_views(SIMCLR_AUG, 0, 1),
    ],
    "moco_v2-resnet50-imagenet": [
        ("batch", 256, f"{MOCO2} Table 2 (batch 256) / {MOCO1} §3.3 (8 GPUs)"),
        ("optim.name", "sgd", f"{MOCO1} §3.3 (SGD, momentum 0.9)"),
        ("optim.momentum", 0.9, f"{MOCO1} §3.3"),
        ("optim.lr_scaling", "linear", f"{MOCO1} §3.3 (lr 0.03 at batch 256)"),
        ("peak_lr", 0.03, f"{MOCO1} §3.3 (initial lr 0.03)"),
        ("optim.weight_decay", 1e-4, f"{MOCO1} §3.3 (weight decay 0.0001)"),
        ("optim.warmup_epochs", 0, f"{MOCO2} §3 (no warm-up)"),
        ("optim.decay", "cosine", f"{MOCO2} §3 (cosine learning-rate schedule)"),
        ("optim.epochs", 800, f"{MOCO2} Table 2 (800 epochs, 71.1%)"),
        ("method.temperature", 0.2, f"{MOCO2} Table 1 (tau 0.2 with the MLP head)"),
        ("method.momentum", 0.999, f"{MOCO1} §4.1 (m = 0.999, constant)"),
        ("method.queue_size", 65536, f"{MOCO1} §4.1 (K = 65536)"),
        ("method.proj_hidden_dim", 2048, f"{MOCO2} §3 (2-layer MLP head, 2048-d hidden)"),
        ("method.proj_dim", 128, f"{MOCO1} §3.3 / {MOCO2} §3 (128-d output)"),
        ("method.symmetric", False, f"{MOCO2} (asymmetric loss)"),
        *_views(MOCO2_AUG, 0, 1),
    ],
    "moco_v3-resnet50-imagenet": [
        ("batch", 4096, f"{MOCO3} §4 (batch 4096) / {MMPRE} (8 x 512)"),
        ("optim.name", "lars", f"{MMPRE} (LARS, momentum 0.9; BN and biases excluded)"),
        ("optim.lr_scaling", "linear", f"{MOCO3} §4 (lr x BatchSize/256)"),
        ("optim.lr", 0.6, f"{MMPRE} (lr 9.6 at 4096 = 0.6 x B/256, 100 epochs)"),
        ("peak_lr", 9.6, MMPRE),
        ("optim.weight_decay", 1e-6, f"{MMPRE} (weight_decay 1e-6, 100 epochs)"),
        ("optim.warmup_epochs", 10, f"{MMPRE} (LinearLR for 10 epochs)"),
        ("optim.epochs", 100, f"{MMPRE} (max_epochs 100)"),
        *MOCO3_COMMON,
        ("method.temperature", 1.0, f"{MOCO3} ResNet-50 (tau 1.0) / {MMPRE} (temperature 1.0)"),
        *_views([("crop_scale", (0.2, 1.0), f"{MMPRE} (RandomResizedCrop scale 0.2-1, 100 epochs)"), *BYOL_AUG], 0, 1),
        *BYOL_PAIR,
    ],
    "moco_v3-vit_b_16-imagenet": [
        ("batch", 4096, f"{MOCO3} §4 (batch 4096)"),
        ("optim.name", "adamw", f"{MOCO3} §4 (AdamW)"),
        ("optim.lr_scaling", "linear", f"{MOCO3} §4 (lr x BatchSize/256)"),
        ("optim.lr", 1.5e-4, f"{MOCO3} §4 (base lr 1.5e-4)"),
        ("peak_lr", 2.4e-3, f"{MOCO3} §4"),
        ("optim.weight_decay", 0.1, f"{MOCO3} §4 (weight decay 0.1)"),
        ("optim.warmup_epochs", 40, f"{MOCO3} §4 (40 warm-up epochs)"),
        ("optim.epochs", 300, f"{MOCO3} §4 / Table 4 (300 epochs)"),
        *MOCO3_COMMON,
        ("method.temperature", 0.2, f"{MOCO3} §4 (tau 0.2 for ViT)"),
        ("model.freeze_patch_embed", True, f"{MOCO3} §5 (random patch projection)"),
        *_views([("crop_scale", (0.08, 1.0), f"{MOCO3} §4 (BYOL's augmentation)"), *BYOL_AUG], 0, 1),
        *BYOL_PAIR,
    ],
    "byol-resnet50-imagenet": [
        ("batch", 4096, f"{BYOL} §3.3 / App. C (batch 4096)"),
        ("optim.name", "lars", f"{BYOL} App. C (LARS, biases and BN excluded)"),
        ("optim.lr_scaling", "linear", f"{BYOL} App. C (lr = 0.2 x BatchSize/256)"),
        ("peak_lr", 3.2, f"{BYOL} App. C"),
        ("optim.weight_decay", 1.5e-6, f"{BYOL} App. C (weight decay 1.5e-6)"),
        ("optim.warmup_epochs", 10, f"{BYOL} App. C (10 warm-up epochs)"),
        ("optim.decay", "cosine", f"{BYOL} App. C (cosine decay)"),
        ("optim.epochs", 1000, f"{BYOL} App. C (1000 epochs)"),
        ("method.tau_base", 0.996, f"{BYOL} §3.3 (tau_base 0.996, cosine to 1)"),
        ("method.proj_hidden_dim", 4096, f"{BYOL} §3.3 (MLP 4096 hidden)"),
        ("method.proj_dim", 256, f"{BYOL} §3.3 (256-d output)"),
        ("method.pred_hidden_dim", 4096, f"{BYOL} §3.3 (predictor: same architecture)"),
        *_views([("crop_scale", (0.08, 1.0), f"{BYOL} Table 6 (crop 0.08-1)"), *BYOL_AUG], 0, 1),
        *BYOL_PAIR,
    ],
    "simsiam-resnet50-imagenet": [
        ("batch", 512, f"{SIMSIAM} §4 (batch 512)"),
        ("optim.name", "sgd", f"{SIMSIAM} §4 (SGD, momentum 0.9)"),
        ("optim.momentum", 0.9, f"{SIMSIAM} §4"),
        ("optim.lr_scaling", "linear", f"{SIMSIAM} §4 (lr x BatchSize/256)"),
        ("optim.lr", 0.05, f"{SIMSIAM} §4 (base lr 0.05)"),
        ("peak_lr", 0.1, f"{SIMSIAM} §4"),
        ("optim.weight_decay", 1e-4, f"{SIMSIAM} §4 (weight decay 0.0001)"),
        ("optim.warmup_epochs", 0, f"{SIMSIAM} §4 (no warm-up at batch 512)"),
        ("optim.decay", "cosine", f"{SIMSIAM} §4 (cosine decay)"),
        ("optim.epochs", 100, f"{SIMSIAM} §4 (100-epoch pre-training)"),
        ("method.proj_dim", 2048, f"{SIMSIAM} §4 (projection MLP, output 2048)"),
        ("method.proj_hidden_dim", 2048, f"{SIMSIAM} §4 (hidden 2048)"),
        ("method.pred_hidden_dim", 512, f"{SIMSIAM} §4 (predictor bottleneck 512)"),
        *_views(MOCO2_AUG, 0, 1),
    ],
    "vicreg-resnet50-imagenet": [
        ("batch", 2048, VICREG_README),
        ("optim.name", "lars", f"{VICREG_CODE} (LARS, exclude_bias_and_norm)"),
        ("optim.lars_eta", 0.001, f"{VICREG_CODE} (LARS eta=0.001)"),
        ("optim.momentum", 0.9, f"{VICREG_CODE} (LARS momentum=0.9)"),
        ("optim.lr_scaling", "linear", f"{VICREG_CODE} (adjust_learning_rate: base_lr x batch_size / 256)"),
        ("optim.lr", 0.2, VICREG_README),
        ("peak_lr", 1.6, VICREG_README),
        ("optim.weight_decay", 1e-6, f"{VICREG_CODE} (--wd 1e-6)"),
        ("optim.warmup_epochs", 10, f"{VICREG_CODE} (adjust_learning_rate: warmup_steps = 10 x len(loader))"),
        ("optim.decay", "cosine", f"{VICREG_CODE} (adjust_learning_rate: cosine)"),
        ("optim.epochs", 1000, VICREG_README),
        ("method.sim_coeff", 25.0, f"{VICREG} implementation details (lambda 25) / {VICREG_CODE} (--sim-coeff 25)"),
        ("method.std_coeff", 25.0, f"{VICREG} implementation details (mu 25) / {VICREG_CODE} (--std-coeff 25)"),
        ("method.cov_coeff", 1.0, f"{VICREG} implementation details (nu 1) / {VICREG_CODE} (--cov-coeff 1)"),
        ("method.proj_layers", 3, f"{VICREG_CODE} (--mlp 8192-8192-8192: three linear layers)"),
        ("method.proj_hidden_dim", 8192, f"{VICREG_CODE} (--mlp 8192-8192-8192)"),
        ("method.proj_dim", 8192, f"{VICREG_CODE} (--mlp 8192-8192-8192)"),
        *_views(
            [
                ("crop_scale", (0.08, 1.0), f"{VICREG_AUG} (RandomResizedCrop's default scale)"),
                *[(k, v, VICREG_AUG) for k, v, _ in BYOL_AUG],
            ],
            0,
            1,
        ),
        *[(k, v, VICREG_AUG) for k, v, _ in BYOL_PAIR],
    ],
    "barlow_twins-resnet50-imagenet": [
        ("batch", 2048, BARLOW_README),
        ("optim.name", "lars", f"{BARLOW_CODE} (LARS, exclude_bias_and_norm from decay and adaptation)"),
        ("optim.lars_eta", 0.001, f"{BARLOW_CODE} (LARS eta=0.001)"),
        ("optim.momentum", 0.9, f"{BARLOW_CODE} (LARS momentum=0.9)"),
        ("optim.lr_scaling", "linear", f"{BARLOW_CODE} (adjust_learning_rate: learning_rate x batch_size / 256)"),
        ("optim.lr", 0.2, BARLOW_README),
        ("peak_lr", 1.6, BARLOW_README),
        ("optim.weight_decay", 1e-6, f"{BARLOW_CODE} (--weight-decay 1e-6)"),
        ("optim.warmup_epochs", 10, f"{BARLOW_CODE} (adjust_learning_rate: warmup_steps = 10 x len(loader))"),
        ("optim.decay", "cosine", f"{BARLOW_CODE} (adjust_learning_rate: cosine)"),
        ("optim.epochs", 1000, BARLOW_README),
        ("method.lambd", 0.0051, BARLOW_README),
        ("method.scale_loss", 0.024, BARLOW_README),
        ("method.proj_layers", 3, f"{BARLOW} implementation details / {BARLOW_README} (three linear layers)"),
        ("method.proj_hidden_dim", 8192, f"{BARLOW} implementation details (3 layers of 8192) / {BARLOW_README}"),
        ("method.proj_dim", 8192, f"{BARLOW} implementation details / {BARLOW_README}"),
        *_views(
            [
                ("crop_scale", (0.08, 1.0), f"{BARLOW_CODE} (Transform: RandomResizedCrop's default scale)"),
                *[(k, v, f"{BARLOW_CODE} (Transform)") for k, v, _ in BYOL_AUG],
            ],
            0,
            1,
        ),
        *[(k, v, f"{BARLOW_CODE} (Transform / transform_prime)") for k, v, _ in BYOL_PAIR],
    ],
    "dino-vit_s_16-imagenet": [
        ("model.backbone", "vit_s_16", f"{DINO_README} (vit_small, patch_size 16)"),
        ("batch", 512, f"{DINO_README} (8 GPUs x batch_size_per_gpu 64)"),
        ("optim.name", "adamw", f"{DINO_CODE} (--optimizer adamw)"),
        ("optim.lr_scaling", "linear", f"{DINO_CODE} (lr x batch_size / 256)"),
        ("optim.lr", 0.0005, f"{DINO_CODE} (--lr 0.0005)"),
        ("peak_lr", 0.001, DINO_CODE),
        ("optim.warmup_epochs", 10, f"{DINO_CODE} (--warmup_epochs 10)"),
        ("optim.decay", "cosine", f"{DINO_CODE} (cosine_scheduler)"),
        ("optim.epochs", 100, f"{DINO_CODE} (--epochs 100)"),
        ("optim.weight_decay", 0.04, f"{DINO_CODE} (--weight_decay 0.04)"),
        ("optim.weight_decay_end", 0.4, f"{DINO_CODE} (--weight_decay_end 0.4, cosine)"),
        ("optim.betas", (0.9, 0.999), f"{DINO_CODE} (torch.optim.AdamW's defaults)"),
        ("method.out_dim", 65536, f"{DINO_CODE} (--out_dim 65536)"),
        ("method.hidden_dim", 2048, f"{DINO_CODE} (DINOHead hidden_dim 2048)"),
        ("method.bottleneck_dim", 256, f"{DINO_CODE} (DINOHead bottleneck_dim 256)"),
        ("method.head_layers", 3, f"{DINO_CODE} (DINOHead nlayers 3)"),
        ("method.use_bn_in_head", False, f"{DINO_CODE} (--use_bn_in_head False)"),
        ("method.norm_last_layer", True, f"{DINO_CODE} (--norm_last_layer True)"),
        ("method.momentum_teacher", 0.996, f"{DINO} §3.1 / {DINO_CODE} (--momentum_teacher 0.996, cosine to 1)"),
        ("method.student_temp", 0.1, f"{DINO_CODE} (DINOLoss student_temp 0.1)"),
        ("method.teacher_temp", 0.04, f"{DINO_CODE} (--teacher_temp 0.04)"),
        ("method.warmup_teacher_temp", 0.04, f"{DINO_CODE} (--warmup_teacher_temp 0.04)"),
        ("method.warmup_teacher_temp_epochs", 0, f"{DINO_CODE} (--warmup_teacher_temp_epochs 0)"),
        ("method.center_momentum", 0.9, f"{DINO_CODE} (DINOLoss center_momentum 0.9)"),
        ("method.freeze_last_layer_epochs", 1, f"{DINO_CODE} (--freeze_last_layer 1)"),
        ("method.clip_grad", 3.0, f"{DINO_CODE} (--clip_grad 3.0)"),
        (
            "view_sizes",
            (224, 224, 96, 96, 96, 96, 96, 96, 96, 96),
            f"{DINO_CODE} (2 global crops of 224, --local_crops_number 8 of 96)",
        ),
        *_views([("crop_scale", (0.4, 1.0), f"{DINO_CODE} (--global_crops_scale 0.4 1)")], 0, 1),
        *_views(
            [
                ("crop_scale", (0.05, 0.4), f"{DINO_CODE} (--local_crops_scale 0.05 0.4)"),
                ("blur_p", 0.5, f"{DINO_AUG} (local: GaussianBlur(p=0.5))"),
                ("solarize_p", 0.0, f"{DINO_AUG} (local: no solarization)"),
            ],
            *range(2, 10),
        ),
        *_views([(k, v, DINO_AUG) for k, v, _ in BYOL_AUG], *range(10)),
        *[(k, v, f"{DINO_AUG} (global 1 / global 2)") for k, v, _ in BYOL_PAIR],
    ],
    "dino-resnet50-imagenet": [
        ("model.backbone", "resnet50", f"{DINO_RN50} (--arch resnet50)"),
        ("batch", 512, f"{DINO_RN50} (8 GPUs x batch_size_per_gpu 64)"),
        ("optim.name", "sgd", f"{DINO_RN50} (--optimizer sgd; main_dino.py: momentum 0.9)"),
        ("optim.momentum", 0.9, f"{DINO_CODE} (SGD momentum=0.9)"),
        ("optim.lr", 0.03, f"{DINO_RN50} (--lr 0.03)"),
        ("peak_lr", 0.06, f"{DINO_RN50} / {DINO_CODE} (lr x batch_size / 256)"),
        ("optim.weight_decay", 1e-4, f"{DINO_RN50} (--weight_decay 1e-4)"),
        ("optim.weight_decay_end", None, f"{DINO_RN50} (--weight_decay_end 1e-4: constant)"),
        ("optim.warmup_epochs", 10, f"{DINO_CODE} (--warmup_epochs 10)"),
        ("optim.epochs", 100, f"{DINO_RN50} (100 epochs)"),
        ("method.out_dim", 65536, f"{DINO_CODE} (--out_dim 65536)"),
        ("method.use_bn_in_head", False, f"{DINO_CODE} (--use_bn_in_head False)"),
        ("method.momentum_teacher", 0.996, f"{DINO_CODE} (--momentum_teacher 0.996)"),
        ("method.teacher_temp", 0.04, f"{DINO_CODE} (--teacher_temp 0.04)"),
        ("method.freeze_last_layer_epochs", 1, f"{DINO_CODE} (--freeze_last_layer 1)"),
        ("method.clip_grad", 3.0, f"{DINO_CODE} (--clip_grad 3.0)"),
        ("view_sizes", (224, 224, 96, 96, 96, 96, 96, 96, 96, 96), f"{DINO_CODE} (--local_crops_number 8)"),
        *_views([("crop_scale", (0.14, 1.0), f"{DINO_RN50} (--global_crops_scale 0.14 1)")], 0, 1),
        *_views(
            [
                ("crop_scale", (0.05, 0.14), f"{DINO_RN50} (--local_crops_scale 0.05 0.14)"),
                ("blur_p", 0.5, f"{DINO_AUG} (local: GaussianBlur(p=0.5))"),
            ],
            *range(2, 10),
        ),
        *_views([(k, v, DINO_AUG) for k, v, _ in BYOL_AUG], *range(10)),
        *[(k, v, f"{DINO_AUG} (global 1 / global 2)") for k, v, _ in BYOL_PAIR],
    ],
    "wav2vec2-base": [
        ("scaling.num_workers", 64, f"{W2V} §4.2 (64 V100s) / {FAIRSEQ} (distributed_world_size 64)"),
        ("data.max_tokens", 1_400_000, f"{W2V} §4.2 (1.4M samples per GPU) / {FAIRSEQ} (max_tokens)"),
        ("max_sample_size", 250_000, f"{W2V} §4.2 (crops of 250k samples) / {FAIRSEQ} (max_sample_size)"),
        ("min_sample_size", 32_000, f"{FAIRSEQ} (min_sample_size 32000)"),
        ("optim.name", "adamw", f"{FAIRSEQ} (adam, weight_decay 0.01: decoupled as AdamW)"),
        ("optim.betas", (0.9, 0.98), f"{FAIRSEQ} (adam_betas)"),
        ("optim.eps", 1e-6, f"{FAIRSEQ} (adam_eps)"),
        ("optim.weight_decay", 0.01, f"{FAIRSEQ} (weight_decay)"),
        ("optim.lr", 5e-4, f"{W2V} §4.2 (peak 5e-4 for BASE) / {FAIRSEQ}"),
        ("optim.lr_scaling", "none", f"{FAIRSEQ} (a fixed lr; batches in samples)"),
        ("optim.updates", 400_000, f"{W2V} §4.2 (BASE trained for 400k updates) / {FAIRSEQ} (max_update 400000)"),
        ("optim.warmup_updates", 32_000, f"{FAIRSEQ} (lr_scheduler warmup_updates 32000)"),
        ("warmup_fraction", 0.08, f"{W2V} §4.2 (warm-up for the first 8%) / {FAIRSEQ} (32k of 400k)"),
        ("optim.decay", "linear", f"{W2V} §4.2 (linearly decayed) / {FAIRSEQ} (polynomial_decay, power 1)"),
        ("method.mask_prob", 0.65, f"{FAIRSEQ} (mask_prob 0.65 default; paper §4.2: p = 0.065, M = 10)"),
        ("method.mask_length", 10, f"{W2V} §4.2 (M = 10)"),
        ("method.num_negatives", 100, f"{W2V} §4.2 (K = 100 distractors)"),
        ("method.logit_temperature", 0.1, f"{W2V} §4.2 (kappa 0.1)"),
        ("method.diversity_weight", 0.1, f"{W2V} §4.2 (alpha 0.1) / {FAIRSEQ} (loss_weights [0.1, 10])"),
        ("method.feature_penalty_weight", 10.0, f"{FAIRSEQ} (loss_weights [0.1, 10])"),
        ("method.codebook_groups", 2, f"{W2V} §4.2 (G = 2)"),
        ("method.codebook_entries", 320, f"{W2V} §4.2 (V = 320)"),
        ("method.gumbel_temperature_start", 2.0, f"{W2V} §4.2 (tau 2 -> 0.5, factor 0.999995)"),
        ("method.gumbel_temperature_end", 0.5, f"{W2V} §4.2"),
        ("method.gumbel_temperature_decay", 0.999995, f"{W2V} §4.2"),
        ("method.final_dim", 256, f"{FAIRSEQ} (final_dim 256)"),
        ("method.embed_dim", 768, f"{W2V} §4.2 (BASE: 12 blocks of dimension 768, FFN 3072)"),
        ("method.num_layers", 12, f"{W2V} §4.2"),
        ("method.ffn_dim", 3072, f"{W2V} §4.2"),
        ("method.layer_drop", 0.05, f"{FAIRSEQ} (encoder_layerdrop)"),
        ("method.dropout_input", 0.1, f"{FAIRSEQ} (dropout_input)"),
        ("method.dropout_features", 0.1, f"{FAIRSEQ} (dropout_features)"),
        ("method.feature_grad_mult", 0.1, f"{FAIRSEQ} (feature_grad_mult)"),
    ],
}


def value(cfg, key: str):
    """A config value by dotted path, a view's augmentation (``views.<i>.<field>``) or a derived one."""
    batch = cfg.scaling.num_workers * cfg.data.batch_size
    derived = {
        "batch": lambda: batch,
        "view_sizes": lambda: tuple(cfg.view_sizes()),
        "peak_lr": lambda: scaled_lr(cfg.optim.lr, batch, cfg.optim.reference_batch, cfg.optim.lr_scaling),
        "warmup_fraction": lambda: (
            cfg.optim.warmup_updates / cfg.optim.updates
            if cfg.optim.updates
            else cfg.optim.warmup_epochs / cfg.optim.epochs
        ),
        "max_sample_size": lambda: round(cfg.data.max_seconds * 16000),
        "min_sample_size": lambda: round(cfg.data.min_seconds * 16000),
    }
    if key in derived:
        return derived[key]()
    if key.startswith("views."):
        _, i, field = key.split(".")
        return getattr(cfg.view_recipes()[int(i)], field)
    out = cfg
    for part in key.split("."):
        out = getattr(out, part)
    return out


ROWS = [(name, key, want, source) for name, rows in RECIPES.items() for key, want, source in rows]


def test_the_table_covers_every_paper_recipe_and_cites_a_source_for_each_row():
    assert set(RECIPES) == {n for n in shipped_configs() if n.endswith("-imagenet")} | {"wav2vec2-base"}
    assert all(source for *_, source in ROWS)
    for name, rows in RECIPES.items():
        keys = [k for k, *_ in rows]
        assert len(keys) == len(set(keys)), name


@pytest.mark.parametrize("name,key,want,source", ROWS, ids=[f"{n}:{k}" for n, k, *_ in ROWS])
def test_a_shipped_recipe_sets_its_papers_value(name, key, want, source):
    got = value(load_config(name), key)
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9), f"{name} {key}: {got}, {source} says {want}"
    else:
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == want, (
            f"{name} {key}: {got}, {source} says {want}"
        )


def test_a_schedule_in_updates_is_that_many_optimiser_steps_whatever_an_epochs_steps():
    optim = load_config("wav2vec2-base").optim
    assert optim.schedule_steps(750) == optim.schedule_steps(3) == (400_000, 32_000)
    assert (optim.epochs, optim.warmup_epochs) == (None, None)
    assert lr_at(32_000, 400_000, 32_000, 5e-4, decay="linear") == pytest.approx(5e-4)  # the peak, after warm-up
    assert lr_at(216_000, 400_000, 32_000, 5e-4, decay="linear") == pytest.approx(2.5e-4)  # halfway down
    # a schedule in epochs: ceil(epochs x steps an epoch), the warm-up rounded down
    simclr = load_config("simclr-resnet50-imagenet").optim
    assert simclr.schedule_steps(313) == (313_000, 3130)
    assert load_config("quickstart", ["optim.epochs=0.5", "optim.warmup_epochs=0.25"]).optim.schedule_steps(7) == (4, 1)
    # back to epochs: both updates keys cleared, the epoch defaults again (10, 1 warm-up)
    again = load_config("wav2vec2-base", ["optim.updates=null", "optim.warmup_updates=null"]).optim
    assert again.schedule_steps(10) == (100, 10)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["optim.epochs=2"], "optim.epochs and optim.updates both give the schedule"),
        (["optim.warmup_epochs=1"], "optim.warmup_epochs and optim.updates both give the schedule"),
        (["optim.warmup_updates=500000"], "longer than optim.updates 400000"),
        (["optim.updates=null"], "optim.warmup_updates needs optim.updates"),
    ],
)
def test_a_schedule_in_updates_refuses_a_second_unit(overrides, words):
    from selfsup.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config("wav2vec2-base", overrides)


def test_linear_decay_is_fairseqs_polynomial_decay_with_power_1():
    # 10 warm-up steps of 110, base 1: warm-up (s + 1) / 10, then 1 - (s - 10) / 100
    assert [lr_at(s, 110, 10, 1.0, decay="linear") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [lr_at(s, 110, 10, 1.0, decay="linear") for s in (10, 35, 60, 85, 109, 110, 200)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.25, 0.01, 0.0, 0.0]
    )
    # cosine at the same steps: (1 + cos(pi t)) / 2
    assert [lr_at(s, 110, 10, 1.0) for s in (10, 35, 60, 85, 110)] == pytest.approx(
        [1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0]
    )
    assert lr_at(60, 110, 10, 2.0, final_fraction=0.1, decay="linear") == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    # fairseq, wav2vec2_base_librispeech: lr 5e-4, 32k warm-up of 400k: half way through the decay, 2.5e-4
    assert lr_at(216_000, 400_000, 32_000, 5e-4, decay="linear") == pytest.approx(2.5e-4)


def test_set_lr_applies_the_decay_and_keeps_fixed_groups():
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD(
        [
            {"params": [w], "base_lr": 0.4},
            {"params": [torch.zeros(1, requires_grad=True)], "base_lr": 0.3, "fixed_lr": True},
        ],
        lr=0.4,
    )
    assert set_lr(opt, 35, 110, 10, "linear") == pytest.approx(0.3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.3])
    assert set_lr(opt, 35, 110, 10) == pytest.approx(0.4 * 0.8535533905932737)


def test_the_momentum_schedules_rise_on_a_cosine_to_1():
    # BYOL §3.3 and MoCo v3 §4: m = 1 - (1 - m_base)(cos(pi k / K) + 1) / 2
    assert [cosine_momentum(0.996, Progress(k, 100)) for k in (0, 50, 100)] == pytest.approx([0.996, 0.998, 1.0])
    assert cosine_momentum(0.99, Progress(25, 100)) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_weight_decay_follows_a_cosine_to_its_end_value_on_decayed_groups_only():
    # DINO's wd_schedule: cosine_scheduler(0.04, 0.4, epochs, niter) = 0.4 + 0.5 (0.04 - 0.4)(1 + cos(pi t / T))
    w, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW(
        [
            {"params": [w], "base_lr": 1.0, "base_weight_decay": 0.04, "weight_decay": 0.04},
            {"params": [b], "base_lr": 1.0, "base_weight_decay": 0.0, "weight_decay": 0.0},
        ]
    )
    for step, want in ((0, 0.04), (25, 0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2), (50, 0.22), (100, 0.4)):
        set_lr(opt, step, 100, 0, weight_decay_end=0.4)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(want) and opt.param_groups[1]["weight_decay"] == 0
    set_lr(opt, 50, 100, 0)  # without an end value the decay stays where it is
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.4)
