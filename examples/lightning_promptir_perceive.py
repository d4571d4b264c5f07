"""PromptIR's PyTorch Lightning trainer with Perceive-IR added: the lines marked ``# Perceive-IR`` are the whole
difference from a plain one (docs/integrate-promptir.md walks through them).

The data set and the LightningModule are written the way the official PromptIR ``train.py`` and
``utils/dataset_utils.py`` are: sample ids with a ``de_type``, ``crop_img(…, base=16)``, a random patch, the 8-mode
``random_augmentation`` (mode 1..7), synthetic noise for the denoising ids, and
``training_step(([name, de_id], degraded, clean), …)`` with L1. Perceive-IR adds, per sample, a positive view (another
patch of the same degraded image), the task id and the proxy negatives read from a render cache with the patch's
exact geometry; and, per step, the guidance and ``QualityAwareLoss`` (L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl).

    pip install -e '.[lightning]'
    python examples/lightning_promptir_perceive.py --data DATA --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxies --num-gpus 4 --epochs 150
    python examples/lightning_promptir_perceive.py --data DATA --tiny --max-steps 3 --batch-size 4 --out runs/smoke

``DATA`` holds one folder per task, ``noise/clean/`` (noise is synthesised), ``rain/{degraded,clean}/`` and
``haze/{degraded,clean}/`` with the same file names in both (``perceive-ir cache render`` renders proxies into the
cache with the keys ``items_from_task_folders`` gives, e.g. ``rain/rain-001.png``). The checkpoints hold the PromptIR
weights under ``net.backbone.*`` and the adapter's under ``net.perceive.*``: ``backbone_state_dict(ckpt)`` gives the
bare PromptIR for upstream evaluation, ``load_weights(adapter, ckpt)`` the whole wrapped network.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.backbones import create_backbone  # noqa: E402
from perceive_components import (  # noqa: E402  # Perceive-IR
    PerceiveAdapter, QualityAwareLoss, QualityPerceiver, freeze_unused_parameters,
)
from perceive_components.data import STANDARD_TASKS, CropFlip  # noqa: E402  # Perceive-IR
from perceive_components.negatives import RenderCache, no_negatives, task_folder_key  # noqa: E402  # Perceive-IR
from perceive_components.tiny import tiny_perceiver, tiny_sgm, tiny_vgg  # noqa: E402  # Perceive-IR (--tiny)

DE_DICT = {"denoise_15": 0, "denoise_25": 1, "denoise_50": 2, "derain": 3, "dehaze": 4}
SIGMAS = {0: 15, 1: 25, 2: 50}
FOLDERS = {3: ("rain", "degraded"), 4: ("haze", "degraded")}


def crop_img(image: np.ndarray, base: int = 16) -> np.ndarray:
    """Centre-crop an (H, W, C) image to multiples of ``base`` (PromptIR's ``crop_img``)."""
    height, width = image.shape[:2]
    cut_h, cut_w = height % base, width % base
    return image[cut_h // 2: height - cut_h + cut_h // 2, cut_w // 2: width - cut_w + cut_w // 2]


def data_augmentation(image: np.ndarray, mode: int) -> np.ndarray:
    """Mode m: ``k = m // 2`` counter-clockwise quarter turns, then a top-bottom flip for odd m (PromptIR's modes)."""
    out = np.rot90(image, k=mode // 2)
    return np.flipud(out) if mode % 2 else out


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


class PromptTrainDataset(Dataset):
    """All-in-one training patches: ``([name, de_id], degraded, clean, positive, task, negatives, mask)``."""

    def __init__(self, root: str | Path, de_type=tuple(DE_DICT), patch_size: int = 128, rain_repeat: int = 120,
                 proxy_cache: str | Path | None = None) -> None:
        self.root, self.patch_size = Path(root), patch_size
        self.sample_ids = []
        if any(name.startswith("denoise") for name in de_type):
            clean = sorted((self.root / "noise" / "clean").iterdir())
            for name in ("denoise_15", "denoise_25", "denoise_50"):
                if name in de_type:
                    self.sample_ids += [{"clean_id": path, "de_type": DE_DICT[name]} for path in clean] * 3
        for name, repeat in (("derain", rain_repeat), ("dehaze", 1)):
            if name in de_type:
                task, folder = FOLDERS[DE_DICT[name]]
                degraded = sorted((self.root / task / folder).iterdir())
                self.sample_ids += [{"clean_id": path, "de_type": DE_DICT[name]} for path in degraded] * repeat
        self.cache = RenderCache(proxy_cache) if proxy_cache else None  # Perceive-IR: rendered once, read per crop

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, idx: int):
        sample = self.sample_ids[idx]
        de_id, path = sample["de_type"], sample["clean_id"]
        full = read_rgb(path)  # the clean image of a denoising id, the degraded image otherwise
        offset = ((full.shape[0] % 16) // 2, (full.shape[1] % 16) // 2)  # Perceive-IR: where crop_img cuts
        if de_id in SIGMAS:
            clean_img = crop_img(full, base=16)
            # Perceive-IR: noise the whole image once (the same per-pixel statistics as noising the patch), so
            # that the positive view below shares the anchor's noise realisation.
            degrad_img = np.clip(clean_img + np.random.randn(*clean_img.shape) * SIGMAS[de_id], 0, 255).astype(np.uint8)
            task, key = "noise", None
        else:
            task, folder = FOLDERS[de_id]
            degrad_img = crop_img(full, base=16)
            clean_img = crop_img(read_rgb(self.root / task / "clean" / path.name), base=16)
            key = task_folder_key(task, path.relative_to(self.root / task / folder))  # Perceive-IR: its cache key
        top, left = self._patch_origin(clean_img)
        mode = random.randint(1, 7)
        degrad_patch, clean_patch = (data_augmentation(self._patch(img, top, left), mode).copy()
                                     for img in (degrad_img, clean_img))
        view_top, view_left = self._patch_origin(clean_img)  # Perceive-IR: the positive view, own patch and mode
        positive = data_augmentation(self._patch(degrad_img, view_top, view_left), random.randint(1, 7)).copy()
        crop = CropFlip.from_dihedral_mode(  # Perceive-IR: the patch's geometry in the file on disk
            (offset[0] + top, offset[1] + left, self.patch_size, self.patch_size), mode, image_size=full.shape[:2])
        negatives, mask = self._negatives(key, task, crop)  # Perceive-IR
        return ([path.stem, de_id], to_tensor(degrad_patch), to_tensor(clean_patch),
                to_tensor(positive), STANDARD_TASKS.id(task), negatives, mask)  # Perceive-IR: the last four

    def _patch_origin(self, image: np.ndarray) -> tuple[int, int]:
        return (random.randint(0, image.shape[0] - self.patch_size), random.randint(0, image.shape[1] - self.patch_size))

    def _patch(self, image: np.ndarray, top: int, left: int) -> np.ndarray:
        return image[top: top + self.patch_size, left: left + self.patch_size]

    def _negatives(self, key: str | None, task: str, crop: CropFlip) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, 3, p, p)`` proxy outputs cut like the patch and ``(K,)`` validity (K = 0 without a cache)."""
        if self.cache is None:
            negatives, mask = no_negatives(1, crop.output_size())
            return negatives[0], mask[0]
        if key is None:  # fresh noise has no rendered proxy: zeros, masked out
            return self.cache.read("", task, size=crop.output_size())
        return self.cache.read(key, task, crop)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)


class PromptIRModel(pl.LightningModule):
    def __init__(self, perceiver: QualityPerceiver | None = None, tiny: bool = False, epochs: int = 150) -> None:
        super().__init__()
        backbone = create_backbone("promptir-tiny" if tiny else "promptir")
        self.net = PerceiveAdapter(backbone, levels=backbone.decoder_levels(),  # Perceive-IR: CFE, SGM, PGM
                                   sgm=tiny_sgm(blocks=4) if tiny else "vit_base_patch14_dinov2.lvd142m")
        self.unused = freeze_unused_parameters(self.net)  # Perceive-IR: PromptIR's dead layers; plain "ddp" works
        self.loss_fn = QualityAwareLoss(  # Perceive-IR: L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl
            tiny_perceiver() if tiny else perceiver, tiny_vgg() if tiny else "vgg16.tv_in1k", vgg_pretrained=not tiny)
        self.epochs = epochs

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ([clean_name, de_id], degrad_patch, clean_patch, positive, task, negatives, mask) = batch
        guidance = self.net.guide(degrad_patch, positive=positive)  # Perceive-IR: Z, Z⁺, DINOv2 priors
        restored = self.net(degrad_patch, guidance=guidance)
        loss, terms = self.loss_fn(restored, clean_patch, degrad_patch, negatives, mask,  # Perceive-IR
                                   guidance=guidance, labels=task)
        self.log_dict({f"train_{name}": value for name, value in terms.items()})  # Perceive-IR: every term
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-4)
        warmup = 15 if self.epochs > 15 else 0

        def factor(epoch: int) -> float:  # linear warm-up for 15 epochs, then cosine to 0 (PromptIR's schedule)
            if epoch < warmup:
                return (epoch + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, self.epochs - warmup)))

        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, factor)]


def main(argv=None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--perceiver", help="stage-1 QualityPerceiver folder or Hub id")  # Perceive-IR
    parser.add_argument("--proxy-cache", help="render cache of the proxy restorers")  # Perceive-IR
    parser.add_argument("--tiny", action="store_true", help="tiny random networks on the CPU (smoke runs)")
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--rain-repeat", type=int, default=120)
    parser.add_argument("--out", default="runs/lightning-promptir-perceive")
    opt = parser.parse_args(argv)
    if not opt.tiny and not opt.perceiver:
        parser.error("--perceiver is required (or --tiny for a smoke run)")

    trainset = PromptTrainDataset(opt.data, patch_size=opt.patch_size, rain_repeat=opt.rain_repeat,
                                  proxy_cache=opt.proxy_cache)
    trainloader = DataLoader(trainset, batch_size=opt.batch_size, pin_memory=not opt.tiny, shuffle=True,
                             drop_last=True, num_workers=opt.num_workers)
    perceiver = QualityPerceiver.from_pretrained(opt.perceiver) if opt.perceiver else None  # Perceive-IR
    model = PromptIRModel(perceiver, tiny=opt.tiny, epochs=opt.epochs)
    checkpoint_callback = ModelCheckpoint(dirpath=Path(opt.out) / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=opt.epochs, max_steps=opt.max_steps, default_root_dir=opt.out,
                         accelerator="cpu" if opt.tiny else "gpu", devices=1 if opt.tiny else opt.num_gpus,
                         strategy="auto" if opt.tiny else "ddp", precision="32" if opt.tiny else "bf16-mixed",
                         callbacks=[checkpoint_callback], enable_progress_bar=not opt.tiny,
                         log_every_n_steps=1 if opt.tiny else 50)
    trainer.fit(model=model, train_dataloaders=trainloader)
    return trainer


if __name__ == "__main__":
    main()
