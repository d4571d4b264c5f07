"""Stage 2 of Perceive-IR on any example backbone: the recipe the four ``train_*perceive*.py`` scripts share.

One training step (SPEC.md §2.4, §3), inside bf16 autocast, on the shared loop (``examples/common``)::

    g  = net.guide(I_d, positive=I_d⁺)  Guidance: CFE runs [I_d; I_d⁺] as one batch → Z, Z⁺; SGM → priors
    R  = net(I_d, guidance=g)           guided backbone
    (L, terms) = QualityAwareLoss(R, G, I_d, P, m, guidance=g, labels=task)
    L  = L1(R, G) + 0.1·L_cl(Z, Z⁺) + 0.05·L_clip(R) + 0.1·L_dpl(R; G, I_d, P_j)

``net`` is the backbone wrapped in ``PerceiveAdapter`` (CFE + SGM on a frozen DINOv2-B + one PGM per decoder
level, optionally PGCA), or the paper's network, which computes its own guidance. It holds the trainable
parts only: under torchrun it alone is wrapped in DDP; its DINOv2 is held frozen (outside ``parameters()``
and ``state_dict()``); CLIP and VGG live in the loss, outside the model. P_j (``K`` proxy negatives) are
read from a render cache with each crop's box and flips (``stage2_data.py``).

The run folder gets ``net.json`` (how to rebuild the network) next to the trainer's checkpoints and
``model.safetensors``; ``build_run_net`` rebuilds and loads it (``examples/evaluate.py --run``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from examples.backbones import PerceiveIRNet, PromptIR, create_backbone, get_backbone_entry, load_checkpoint
from examples.backbones.checkpoints import check_state_dict_fits
from perceive_components import PerceiveAdapter, QualityAwareLoss, QualityPerceiver
from perceive_components.data.layouts import LAYOUTS, AllInOneTrainSet, standard_test_sets
from perceive_components.losses import probe_psnr
from perceive_components.modules.sgm import DEFAULT_DINOV2, SGM, create_dinov2, spread_blocks
from perceive_components.ops.checkpoint import atomic_write
from perceive_components.ops.validation import set_value_checks

from .checkpoints import CheckpointManager
from .config import add_train_args, config_from_args, parse_repeats
from .distributed import close_distributed, init_distributed
from .sampling import seeded_global_rng
from .stage2_data import CachedNegatives, cache_noise_seed, open_proxy_cache, probe_crops
from .trainer import Trainer

logger = logging.getLogger(__name__)

NET_FILE = "net.json"
NET_FORMAT = "perceive-components/stage2-net"
FROZEN_MODES = ("pretrained", "random", "tiny")
FROZEN_SEED = 0  # random and tiny frozen nets: the same weights in every process and at evaluation
TINY_DINOV2 = ("vit_small_patch14_dinov2.lvd142m", 56, {"depth": 2, "embed_dim": 32, "num_heads": 2})
TERMS = ("l1", "contrastive", "clip", "perceptual")  # logged in this order (fixed CSV columns)


# Backbone parameters that the backbone's own forward never uses (upstream quirks), by name prefix. They are
# frozen (no gradient, no optimiser state, still saved), so DDP needs no ``find_unused_parameters``.
UNUSED_PARAMETERS: dict[type, tuple[str, ...]] = {PromptIR: ("chnl_reduce", "reduce_noise_channel_")}


@dataclass(frozen=True)
class Recipe:
    """What a script fixes: its default backbone and its ``--help`` text."""

    backbone: str
    description: str


# ------------------------------------------------------------------------------------- networks
def build_dinov2(frozen: str) -> tuple[nn.Module, int]:
    """(timm ViT, input size): DINOv2-B/14 with its weights (``pretrained``), the same with seeded random
    weights (``random``: timing without downloads), or a seeded 2-block, 32-wide one (``tiny``: tests)."""
    with seeded_global_rng(FROZEN_SEED):
        if frozen == "tiny":
            name, size, kwargs = TINY_DINOV2
            return create_dinov2(name, False, size, None, **kwargs), size
        return create_dinov2(DEFAULT_DINOV2, frozen == "pretrained", 224, None), 224


def is_self_guided(backbone: str) -> bool:
    """True for the paper's network, which has CFE, SGM and PGM inside (it is not wrapped)."""
    return issubclass(get_backbone_entry(backbone).cls, PerceiveIRNet)


def build_net(spec: Mapping[str, Any]) -> nn.Module:
    """The trainable network described by ``spec`` (``net.json``), with random trainable weights; its input value
    checks are off (the step's losses check the values, and no check reads back to the host mid-forward)."""
    dinov2, size = build_dinov2(spec["frozen"])
    if spec["adapter"]:
        backbone = create_backbone(spec["backbone"])
        net = PerceiveAdapter(backbone, levels=backbone.decoder_levels(), sgm=dinov2, sgm_kwargs={"image_size": size},
                              pgca=spec["pgca"], pad=True)
    else:
        sgm = SGM(dinov2, blocks=spread_blocks(len(dinov2.blocks), 4), image_size=size)  # (1, 4, 8, 12) for DINOv2-B
        net = create_backbone(spec["backbone"], dinov2=sgm, semantic_dim=sgm.embed_dim, dinov2_image_size=size)
    return set_value_checks(net, False)


def backbone_of(net: nn.Module) -> nn.Module:
    return net.backbone if isinstance(net, PerceiveAdapter) else net


def freeze_unused(net: nn.Module) -> list[str]:
    """``requires_grad=False`` on the backbone's ``UNUSED_PARAMETERS``; returns their names."""
    backbone = backbone_of(net)
    prefixes = UNUSED_PARAMETERS.get(type(backbone), ())
    named = dict(backbone.named_parameters())
    frozen = [name for name in named if name.startswith(prefixes)]
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in frozen)]
    if unmatched:
        raise ValueError(f"no {type(backbone).__name__} parameter starts with {unmatched}: UNUSED_PARAMETERS is stale")
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


def whole_image_guidance(net: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """``{"guidance": net.guide(images)}`` of whole images, to pass with each tile of them to ``net``."""
    return {"guidance": net.guide(images)}


def read_net_spec(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / NET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --run must be a run folder of a train_*perceive*.py script")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("format") != NET_FORMAT:
        raise ValueError(f"{path} is not a stage-2 network description (format {spec.get('format')!r})")
    return spec


def run_weights(run_dir: str | Path, weights: str = "auto", checkpoint: str | Path | None = None
                ) -> tuple[dict[str, torch.Tensor], str]:
    """State dict of a run: its exported ``model[_ema].safetensors``, or ``checkpoint`` (a trainer checkpoint
    ``step_*.pt`` or its ``latest`` pointer). ``weights``: ``auto`` (EMA when the run has one), ``model``, ``ema``."""
    from safetensors.torch import load_file

    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    if checkpoint is None:
        ema, plain = Path(run_dir) / "model_ema.safetensors", Path(run_dir) / "model.safetensors"
        path = ema if weights == "ema" or (weights == "auto" and ema.is_file()) else plain
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (written at the end of training); pass a trainer "
                                    f"checkpoint instead, e.g. {Path(run_dir) / 'checkpoints' / 'latest'}")
        return load_file(str(path)), str(path)
    path = Path(checkpoint)
    if path.name == "latest":
        path = CheckpointManager(path.parent).latest() or path
    state = CheckpointManager.load(path)
    if not isinstance(state, Mapping) or "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint of examples/common (no 'model' entry)")
    use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
    if use_ema and state.get("ema") is None:
        raise ValueError(f"{path} holds no EMA weights (the run had --ema-decay 0); use --weights model")
    return dict(state["ema"] if use_ema else state["model"]), f"{path} ({'ema' if use_ema else 'model'})"


def build_run_net(run_dir: str | Path, weights: str = "auto", checkpoint: str | Path | None = None) -> nn.Module:
    """Rebuild a stage-2 run's network from ``net.json`` and load its trained weights strictly."""
    net = build_net(read_net_spec(run_dir))
    state, source = run_weights(run_dir, weights, checkpoint)
    check_state_dict_fits(net, state, source=source)
    net.load_state_dict(state, strict=True)
    return net


# ------------------------------------------------------------------------------------- losses
def tiny_vgg16_layout() -> nn.Sequential:
    """The VGG-16 ``features`` layout up to relu3_3 and one layer beyond, with 4-6 channels (tests)."""
    def conv(c_in: int, c_out: int) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, 3, padding=1)

    with seeded_global_rng(FROZEN_SEED):
        return nn.Sequential(
            conv(3, 4), nn.ReLU(True), conv(4, 4), nn.ReLU(True), nn.MaxPool2d(2),
            conv(4, 5), nn.ReLU(True), conv(5, 5), nn.ReLU(True), nn.MaxPool2d(2),
            conv(5, 6), nn.ReLU(True), conv(6, 6), nn.ReLU(True), conv(6, 6), nn.ReLU(True), nn.MaxPool2d(2),
            conv(6, 6), nn.ReLU(True))


def build_perceiver(args: argparse.Namespace) -> QualityPerceiver:
    """The stage-1 perceiver (``--perceiver``: Hub id or folder) on the CLIP of ``--frozen``; without
    ``--perceiver`` (random/tiny CLIP only) untrained prompts, for smoke runs and timing."""
    clip = None
    if args.frozen == "tiny":
        from perceive_components.tiny import TINY_CLIP_NAME, tiny_clip  # the CLIP of `--clip-model perceive-tiny-clip`

        clip, name = tiny_clip(FROZEN_SEED), TINY_CLIP_NAME
    elif args.frozen == "random":
        import open_clip

        with seeded_global_rng(FROZEN_SEED):
            clip, name = open_clip.create_model(args.clip_arch, pretrained=None), args.clip_arch
    if args.perceiver:
        return QualityPerceiver.from_pretrained(args.perceiver, clip=clip)
    if clip is None:
        raise ValueError("--perceiver is required: the stage-1 output (e.g. runs/stage1/perceiver) or a Hub id; "
                         "pass --clip-weight 0 to train without the CLIP-aware loss")
    logger.warning("no --perceiver: the CLIP-aware loss uses UNTRAINED prompts (smoke runs and timing only)")
    with seeded_global_rng(FROZEN_SEED):
        return QualityPerceiver(clip_model=name, pretrained=None, clip=clip)


def build_criterion(args: argparse.Namespace, perceiver: QualityPerceiver | None = None) -> QualityAwareLoss:
    """L1 + λ1·L_cl + λ2·L_clip + λ3·L_dpl with the flags' weights and frozen networks.

    ``perceiver``: a built stage-1 perceiver instead of ``--perceiver`` (in-process callers such as
    ``examples/demo.py``); the loss freezes it and drops its text tower."""
    if perceiver is not None:
        if args.perceiver:
            raise ValueError("give the perceiver either as --perceiver or as an instance, not both")
        if not isinstance(perceiver, QualityPerceiver):
            raise TypeError(f"perceiver must be a QualityPerceiver, got {type(perceiver).__name__}")
    elif args.clip_weight > 0:
        perceiver = build_perceiver(args)
    if args.frozen == "tiny":
        vgg: str | nn.Module = tiny_vgg16_layout()
    else:
        vgg = args.vgg
    with seeded_global_rng(FROZEN_SEED):  # random VGG weights are seeded; pretrained ones are what they are
        return QualityAwareLoss(
            perceiver, vgg, vgg_pretrained=args.frozen == "pretrained", l1_weight=args.l1_weight,
            contrastive_weight=args.cl_weight, clip_weight=args.clip_weight, perceptual_weight=args.dpl_weight,
            temperature=args.temperature, clip_form=args.clip_form, clip_logit_scale=args.clip_logit_scale,
            difficulty=args.difficulty)


# ------------------------------------------------------------------------------------- the step
class PerceiveStep:
    """``step(net, batch) -> (loss, terms)`` for the trainer (module docstring).

    With ``probe`` crops (difficulty ``"probe"``, SPEC §2.2) the model's mean PSNR on them is measured at
    every epoch start and used as the reference of every sample's difficulty weights during that epoch. The
    values are kept in ``<out>/probe_psnr.json``, so a run resumed mid-epoch uses its epoch's value again.
    """

    def __init__(self, criterion: QualityAwareLoss, probe: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 *, out_dir: str | Path = ".", batch_size: int = 8, bf16: bool = False) -> None:
        self.criterion, self.probe, self.batch_size, self.bf16 = criterion, probe, batch_size, bf16
        self.record_path = Path(out_dir) / "probe_psnr.json"
        self.trainer: Trainer | None = None  # set once the trainer exists (it knows the step)
        self.epoch: int | None = None
        self.model_psnr: float | None = None
        weights = {"l1": criterion.l1_weight, "contrastive": criterion.contrastive_weight,
                   "clip": criterion.clip_weight, "perceptual": criterion.perceptual_weight}
        self.terms = [name for name in TERMS if weights[name] > 0] + (["probe_psnr"] if probe else [])

    def __call__(self, net: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        model_psnr = self._reference(raw) if self.probe is not None else None
        guidance = raw.guide(batch["degraded"], positive=batch["positive"])
        restored = net(batch["degraded"], guidance=guidance)
        if not bool(torch.isfinite(restored).all()):  # let the trainer skip the step (the loss would raise)
            nan = restored.float().sum() * float("nan")
            return nan, {name: nan.detach() for name in self.terms}
        total, terms = self.criterion(
            restored, batch["target"], batch["degraded"], batch.get("negatives"), batch.get("negative_mask"),
            guidance=guidance, labels=batch["task"],
            model_psnr=model_psnr)
        if model_psnr is not None:
            terms["probe_psnr"] = torch.tensor(model_psnr)
        return total, {name: terms[name] for name in self.terms}

    def _reference(self, model: nn.Module) -> float:
        step, per_epoch = self.trainer.step, self.trainer.sampler.steps_per_epoch
        epoch = step // per_epoch
        if epoch != self.epoch:
            record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
            if step % per_epoch and str(epoch) in record:  # resumed mid-epoch: this epoch's measurement
                self.model_psnr = float(record[str(epoch)])
            else:
                if step % per_epoch:
                    logger.warning("no probe PSNR recorded for epoch %d: measuring it now (step %d)", epoch, step)
                self.model_psnr = self._measure(model)
                record[str(epoch)] = self.model_psnr
                if self.trainer.env.is_main:
                    with atomic_write(self.record_path) as tmp:
                        tmp.write_text(json.dumps(record, indent=1))
                    logger.info("epoch %d: probe PSNR %.3f dB (difficulty reference)", epoch, self.model_psnr)
            self.epoch = epoch
        return self.model_psnr

    def _measure(self, model: nn.Module) -> float:
        env = self.trainer.env
        mine = self.probe[env.rank::env.world_size]
        batches = [tuple(torch.stack(part) for part in zip(*mine[i:i + self.batch_size]))
                   for i in range(0, len(mine), self.batch_size)]
        return probe_psnr(model, batches, device=env.device, autocast_dtype=torch.bfloat16 if self.bf16 else None)


# ------------------------------------------------------------------------------------- command line
def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=recipe.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (docs/data.md)")
    data.add_argument("--data", required=True, help="data root holding train/ (and test/ for validation)")
    data.add_argument("--layout", default="3task", choices=sorted(LAYOUTS))
    data.add_argument("--crop-size", type=int, default=256)
    data.add_argument("--repeat", nargs="*", default=[], metavar="TASK=N", help="override task repeat factors")
    data.add_argument("--noise-seed", type=int, help="fix one noise realisation per (image, σ), as the proxy cache "
                      "was rendered (default: the cache's inputs/settings.json; fresh noise without a cache)")
    data.add_argument("--val", action=argparse.BooleanOptionalAction, default=None,
                      help="validate on <data>/test (default: if that folder exists)")
    net = parser.add_argument_group("network")
    net.add_argument("--backbone", default=recipe.backbone, help=f"registry name (default {recipe.backbone})")
    net.add_argument("--init-backbone", help="official backbone checkpoint to start from (BasicSR / Lightning / "
                     "the authors' layout; examples/backbones/checkpoints.py)")
    net.add_argument("--pgca", action="store_true", help="add one PGCA block per decoder level (adapter only)")
    net.add_argument("--frozen", choices=FROZEN_MODES, default="pretrained",
                     help="DINOv2/CLIP/VGG: pretrained weights (default), the same nets with random weights "
                     "(timing without downloads), or tiny random ones (tests)")
    net.add_argument("--tiny", action="store_true", help="the backbone's '-tiny' config and --frozen tiny (CPU tests)")
    losses = parser.add_argument_group("losses (SPEC §2; docs/losses.md)")
    losses.add_argument("--perceiver", help="stage-1 QualityPerceiver: folder (runs/stage1/perceiver) or Hub id")
    losses.add_argument("--clip-arch", default="ViT-B-32-quickgelu", help="open_clip architecture for --frozen random")
    losses.add_argument("--vgg", default="vgg16.tv_in1k", help="timm VGG-16 name")
    losses.add_argument("--l1-weight", type=float, default=1.0)
    losses.add_argument("--cl-weight", type=float, default=0.1, help="λ1, contrastive loss on CFE")
    losses.add_argument("--clip-weight", type=float, default=0.05, help="λ2, CLIP-aware loss")
    losses.add_argument("--dpl-weight", type=float, default=0.1, help="λ3, difficulty-adaptive perceptual loss")
    losses.add_argument("--temperature", type=float, default=0.1, help="InfoNCE τ of L_cl")
    losses.add_argument("--clip-form", choices=("one_minus_p", "nll"), default="one_minus_p")
    losses.add_argument("--clip-logit-scale", type=float, help="default: the perceiver's (≈100); 1 = authors' code")
    losses.add_argument("--difficulty", choices=("online", "probe"), default="online",
                        help="difficulty weights from each sample's PSNR (online) or a probe set per epoch (authors)")
    losses.add_argument("--probe-crops", type=int, default=24, help="probe crops per task (--difficulty probe)")
    proxies = parser.add_argument_group("proxy negatives (docs/negatives.md)")
    proxies.add_argument("--proxy-cache", help="render cache of the proxies (stage-1 fold models, your restorers)")
    proxies.add_argument("--proxy-slots", nargs="*", help="cache slots to use, in order (default: all)")
    proxies.add_argument("--no-proxies", action="store_true", help="L_dpl with the easy negative only")
    add_train_args(parser, bf16=True, batch_size=None)
    for action in parser._actions:
        if action.dest == "batch_size":
            action.help = "GLOBAL batch over all processes (default: 8 for 3task, 4 for 5task, SPEC §4)"
    return parser


def net_spec(args: argparse.Namespace) -> dict[str, Any]:
    adapter = not is_self_guided(args.backbone)
    if args.pgca and not adapter:
        raise ValueError(f"--pgca applies to adapter-wrapped backbones; {args.backbone} has its own PGCA (ETB)")
    return {"format": NET_FORMAT, "backbone": args.backbone, "adapter": adapter, "pgca": bool(args.pgca),
            "frozen": args.frozen}


def claim_run_folder(out_dir: Path, spec: dict[str, Any], is_main: bool) -> None:
    """Write ``net.json``; refuse a folder whose checkpoints belong to another network."""
    path = out_dir / NET_FILE
    if path.is_file() and CheckpointManager(out_dir / "checkpoints").latest() is not None:
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = {key: (old.get(key), value) for key, value in spec.items() if old.get(key) != value}
        if changed:
            raise ValueError(f"{out_dir} holds checkpoints of another network (net.json: old, new = {changed}); "
                             "use another --out-dir, or the settings it was trained with")
    if is_main:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(spec, indent=2), encoding="utf-8")


def train_data(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, AllInOneTrainSet]:
    """The training set, with proxy negatives from ``--proxy-cache`` unless ``--no-proxies``."""
    if bool(args.proxy_cache) == bool(args.no_proxies):
        raise ValueError("pass --proxy-cache DIR (the render cache of the proxies, docs/training.md) or --no-proxies "
                         "(L_dpl with the easy negative only), not both or neither")
    if args.proxy_cache and args.dpl_weight == 0:
        raise ValueError("--dpl-weight 0 turns L_dpl off, so the proxy negatives of --proxy-cache would be read and "
                         "never used: pass --no-proxies instead")
    noise_seed = args.noise_seed
    if args.proxy_cache:
        recorded = cache_noise_seed(args.proxy_cache)
        if noise_seed is None:
            noise_seed = recorded
        elif recorded is not None and recorded != noise_seed:
            raise ValueError(f"--noise-seed {noise_seed} differs from the seed the cache's noisy inputs were written "
                             f"with ({recorded}, {args.proxy_cache}/inputs/settings.json)")
    train_set = AllInOneTrainSet(args.data, args.layout, crop_size=args.crop_size, repeats=parse_repeats(args.repeat),
                                 positive=True, noise_seed=noise_seed)
    if args.no_proxies:
        return train_set, train_set
    cache, slots = open_proxy_cache(args.proxy_cache, train_set, args.proxy_slots)
    logger.info("proxy negatives: K = %d slot(s) %s of %s", len(slots), slots, args.proxy_cache)
    return CachedNegatives(train_set, cache, slots), train_set


def run(recipe: Recipe, argv: Sequence[str] | None = None, *, perceiver: QualityPerceiver | None = None
        ) -> dict[str, float]:
    """Parse ``argv``, build everything and train; returns the last validation metrics.

    ``perceiver``: a built stage-1 perceiver in place of ``--perceiver`` (see ``build_criterion``)."""
    args = build_parser(recipe).parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tiny:
        args.frozen = "tiny"
        args.backbone += "" if args.backbone.endswith("-tiny") else "-tiny"
    if args.batch_size is None:
        args.batch_size = 4 if args.layout == "5task" else 8  # SPEC §4: global batch 8 (3-task) / 4 (5-task)
    config = config_from_args(args)
    env = init_distributed(config.device)
    try:
        spec = net_spec(args)
        claim_run_folder(Path(config.out_dir), spec, env.is_main)
        torch.manual_seed(config.seed)  # the same initial weights in every process
        net = build_net(spec)
        if args.init_backbone:
            load_checkpoint(backbone_of(net), args.init_backbone)
            logger.info("backbone weights from %s", args.init_backbone)
        unused = freeze_unused(net)
        if unused and main_process:
            logger.info("frozen (never used by the backbone's forward): %s", ", ".join(unused))
        dataset, train_set = train_data(args)
        criterion = build_criterion(args, perceiver).to(env.device)
        probe = probe_crops(train_set, args.probe_crops, config.seed) if args.difficulty == "probe" else None
        validate = (Path(args.data) / "test").is_dir() if args.val is None else args.val
        val_sets = standard_test_sets(args.data, args.layout) if validate else None
        if main_process:
            trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
            logger.info("%s: %d trainable parameters; items per epoch %s", args.backbone, trainable, train_set.counts())
        step = PerceiveStep(criterion, probe, out_dir=config.out_dir, batch_size=config.batch_size // env.world_size,
                            bf16=config.bf16)
        trainer = Trainer(net, dataset, step, config, val_sets=val_sets)
        step.trainer = trainer
    except BaseException:
        close_distributed()
        raise
    return trainer.fit()


def command_line(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run a script's ``main``; bad data, caches, checkpoints or options end with their message, no traceback."""
    try:
        main(None)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
