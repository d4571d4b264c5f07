"""Train a restoration network with Perceive-IR (stage 2, docs/training.md): the integration to copy, top to bottom.

One step, inside bf16 autocast (docs/method.md §2–§4)::

    guidance   = net.guide(I_d, positive=I_d⁺)   CFE on [I_d; I_d⁺] as one batch → Z, Z⁺; frozen DINOv2 → priors
    R          = ddp(I_d, guidance=guidance)      the backbone, its decoder levels modulated by PGM(priors, Z)
    L, terms   = criterion(R, G, I_d, P, m, guidance=guidance, labels=task)
               = L1(R, G) + 0.1·L_cl(Z, Z⁺) + 0.05·L_clip(R) + 0.1·L_dpl(R; G, I_d, P_1…P_K)

I_d⁺ is a second crop of the same degraded image; P are K proxy restorers' outputs, rendered once into a render
cache and read with the crop's own geometry, m their validity. ``--backbone restormer`` (default), ``nafnet`` or
``promptir`` is wrapped in ``PerceiveAdapter``; ``perceive-ir-net`` is the paper's network, which has CFE, SGM and
PGM inside. The generic loop machinery (resume, EMA, logs, checkpoints, DDP) is in ``train_support.py``.

    python examples/train_restormer_perceive.py --data /data/allinone --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxy-cache --out-dir runs/restormer-3task
    torchrun --standalone --nproc_per_node 4 examples/train_restormer_perceive.py --backbone nafnet (same flags)
    python examples/train_restormer_perceive.py --data DIR --tiny --no-proxies --steps 20 --device cpu  # smoke run
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.backbones import PerceiveIRNet, create_backbone, get_backbone_entry, load_checkpoint  # noqa: E402
from examples.prepare_proxy_inputs import cache_key, recorded_noise_seed, task_of_key  # noqa: E402
from examples.train_support import (  # noqa: E402
    DistEnv, EpochRecord, ResumableBatchSampler, TrainConfig, TrainingRun, add_train_args, claim_run_folder,
    config_from_args, distributed_job, move_to, parse_repeats, read_net_spec, run_weights, seeded_global_rng,
    training_loader,
)
from perceive_components import (  # noqa: E402
    PerceiveAdapter, QualityAwareLoss, QualityPerceiver, freeze_unused_parameters, load_backbone_weights, load_weights,
)
from perceive_components.data import (  # noqa: E402
    LAYOUTS, AllInOneTrainSet, CropFlip, TaskMixingBatchSampler, scan_images, standard_test_sets,
)
from perceive_components.losses import probe_psnr  # noqa: E402
from perceive_components.modules import DEFAULT_DINOV2  # noqa: E402
from perceive_components.negatives import CacheItem, RenderCache  # noqa: E402
from perceive_components.ops.validation import set_value_checks  # noqa: E402
from perceive_components.tiny import tiny_perceiver, tiny_sgm, tiny_vgg  # noqa: E402

logger = logging.getLogger("train_perceive")
NET_FORMAT = "perceive-components/stage2-net"  # net.json: how to rebuild a run's network
TERMS = ("l1", "contrastive", "clip", "perceptual")  # logged in this order, each before its λ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (docs/data.md)")
    data.add_argument("--data", required=True, help="data root holding train/ (and test/ for validation)")
    data.add_argument("--layout", default="3task", choices=sorted(LAYOUTS))
    data.add_argument("--crop-size", type=int, default=256)
    data.add_argument("--repeat", nargs="*", default=[], metavar="TASK=N", help="override task repeat factors")
    data.add_argument("--noise-seed", type=int, help="one fixed noise realisation per (image, σ), as the proxy cache "
                      "was rendered (default: the cache's inputs/settings.json; fresh noise without a cache)")
    data.add_argument("--mix-tasks", action="store_true", help="every global batch holds >= 2 tasks "
                      "(TaskMixingBatchSampler), so L_cl always has negatives; default: shuffled epochs (authors)")
    data.add_argument("--scan-cache", help="file remembering scanned good images (default <out-dir>/image_scan.json)")
    data.add_argument("--val", action=argparse.BooleanOptionalAction, default=None,
                      help="validate on <data>/test (default: if that folder exists)")
    net = parser.add_argument_group("network")
    net.add_argument("--backbone", default="restormer", help="restormer, nafnet, promptir, perceive-ir-net, or any "
                     "name of examples/backbones (e.g. restormer-tiny)")
    net.add_argument("--init-backbone", help="official backbone checkpoint to start from (BasicSR, Lightning, authors)")
    net.add_argument("--pgca", action="store_true", help="one PGCA block per decoder level (adapter only)")
    net.add_argument("--no-sgm", action="store_true", help="the adapter without SGM: no DINOv2 priors, the PGMs "
                     "driven by CFE alone (e.g. offline, where DINOv2 could only be random; adapter only)")
    net.add_argument("--frozen", choices=("pretrained", "random", "tiny"), default="pretrained", help="DINOv2/CLIP/"
                     "VGG: pretrained, the same with random weights (timing offline), or tiny random ones (tests)")
    net.add_argument("--tiny", action="store_true", help="the backbone's '-tiny' config and --frozen tiny (CPU tests)")
    loss = parser.add_argument_group("losses (docs/losses.md)")
    loss.add_argument("--perceiver", help="stage-1 QualityPerceiver: folder (runs/stage1/perceiver) or Hub id")
    loss.add_argument("--vgg", default="vgg16.tv_in1k", help="timm VGG-16 name")
    for name, default, text in (("l1", 1.0, "L1"), ("cl", 0.1, "λ1, L_cl"), ("clip", 0.05, "λ2, L_clip"),
                                ("dpl", 0.1, "λ3, L_dpl")):
        loss.add_argument(f"--{name}-weight", type=float, default=default, help=f"{text} (default {default})")
    loss.add_argument("--temperature", type=float, default=0.1, help="InfoNCE τ of L_cl")
    loss.add_argument("--clip-form", choices=("one_minus_p", "nll"), default="one_minus_p")
    loss.add_argument("--clip-logit-scale", type=float, help="default: the perceiver's (≈100); 1 = authors' code")
    loss.add_argument("--difficulty", choices=("online", "probe"), default="online", help="difficulty weights from "
                      "each sample's PSNR (online), or from a probe set measured every epoch (authors)")
    loss.add_argument("--probe-crops", type=int, default=24, help="probe crops per task (--difficulty probe)")
    proxies = parser.add_argument_group("proxy negatives (docs/negatives.md)")
    proxies.add_argument("--proxy-cache", help="render cache of the proxies (stage-1 fold models, your restorers)")
    proxies.add_argument("--proxy-slots", nargs="*", help="cache slots to use, in order (default: all)")
    proxies.add_argument("--no-proxies", action="store_true", help="L_dpl with the easy negative only")
    return add_train_args(parser, bf16=True, batch_size=None)  # batch: 8 for 3task, 4 for 5task (authors)


# --------------------------------------------------------------------------------------------------- data
class WithNegatives(Dataset):
    """Items of ``train_set`` plus ``negatives (K, 3, h, w)`` read from ``cache`` with each item's own crop geometry
    (``CropFlip``) and ``negative_mask (K,)`` (False, without a disk read, where a slot does not cover the task)."""

    def __init__(self, train_set: AllInOneTrainSet, cache: RenderCache, slots: Sequence[str]) -> None:
        self.train_set, self.cache, self.slots = train_set, cache, list(slots)

    def __len__(self) -> int:
        return len(self.train_set)

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        item = self.train_set.sample(index, generator)
        item["negatives"], item["negative_mask"] = self.cache.read(
            cache_key(item["path"]), item["task"], CropFlip.from_tensor(item["crop"]), slots=self.slots)
        return item


def open_proxy_cache(args: argparse.Namespace, train_set: AllInOneTrainSet, env: DistEnv) -> WithNegatives:
    """The training set with its negatives, once the cache is known to hold every input, rendered from these pixels
    (``verify`` refuses a cache of another data set with the same file names)."""
    cache = RenderCache(args.proxy_cache)
    slots = list(args.proxy_slots or cache.slots)
    if not slots or set(slots) - set(cache.slots):
        raise ValueError(f"render cache {args.proxy_cache!r} has slots {cache.slots}; asked for {slots}")
    covering = [slot for slot in slots if cache.covers(slot, "noise")]
    if "noise" in train_set.tasks and train_set.noise_seed is None and covering:
        raise ValueError(f"slot(s) {covering} of {args.proxy_cache!r} cover noise, but noise is synthesised afresh at "
                         "every draw (no --noise-seed), so no cached render can match it; pass --noise-seed")
    source = {cache_key(key): key for key in train_set.cache_keys()}
    items = [CacheItem(key, Path(key), task_of_key(key)) for key in source]
    env.on_main(lambda: cache.verify(items, slots=slots, progress=True,
                                     read=lambda item: train_set.degraded_image(source[item.key])))
    logger.info("proxy negatives: K = %d slot(s) %s of %s", len(slots), slots, args.proxy_cache)
    return WithNegatives(train_set, cache, slots)


def training_data(args: argparse.Namespace, env: DistEnv) -> tuple[Dataset, AllInOneTrainSet, dict]:
    """The training set (with proxy negatives unless ``--no-proxies``) and the validation sets, every image of
    both checked before step 1 (``scan_images``: one error listing every bad file)."""
    if bool(args.proxy_cache) == bool(args.no_proxies):
        raise ValueError("pass --proxy-cache DIR (the render cache of the proxies, docs/training.md) or --no-proxies "
                         "(L_dpl with the easy negative only), not both or neither")
    if args.proxy_cache and args.dpl_weight == 0:
        raise ValueError("--dpl-weight 0 turns L_dpl off, so the negatives of --proxy-cache would never be used: "
                         "pass --no-proxies instead")
    recorded = recorded_noise_seed(args.proxy_cache) if args.proxy_cache else None
    if args.noise_seed is not None and recorded is not None and recorded != args.noise_seed:
        raise ValueError(f"--noise-seed {args.noise_seed} differs from the seed the cache's noisy inputs were written "
                         f"with ({recorded}, {args.proxy_cache}/inputs/settings.json)")
    train_set = AllInOneTrainSet(args.data, args.layout, crop_size=args.crop_size, repeats=parse_repeats(args.repeat),
                                 noise_seed=recorded if args.noise_seed is None else args.noise_seed)
    validate = (Path(args.data) / "test").is_dir() if args.val is None else args.val
    val_sets = standard_test_sets(args.data, args.layout) if validate else {}
    pairs = [pair for pairs in train_set.pairs.values() for pair in pairs]
    pairs += [pair for test_set in val_sets.values() for pair in test_set.pairs]
    files = [path for pair in pairs for path in (pair.clean, pair.degraded) if path is not None]
    scan = args.scan_cache or Path(args.out_dir) / "image_scan.json"
    logger.info("images: %s", env.on_main(lambda: scan_images(files, cache=scan, progress=True)))
    return (open_proxy_cache(args, train_set, env) if args.proxy_cache else train_set), train_set, val_sets


def probe_reference(args: argparse.Namespace, config: TrainConfig, env: DistEnv, train_set: AllInOneTrainSet,
                    net: nn.Module, *, fresh: bool) -> Callable[[int], float]:
    """The authors' "probe" difficulty rule as ``probe(epoch) -> dB``: the model's mean PSNR on ``--probe-crops``
    fixed training crops per task (spread over the task's items, each drawn with its own seed), measured at the
    epoch's first step (each process its share, the mean over all) and kept in ``probe_psnr.json``, so a resumed
    run reuses its epoch's value."""
    crops, start = [], 0
    for task_index, (_, items) in enumerate(train_set.counts().values()):
        for i in range(args.probe_crops):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + task_index * 1_009 + i)
            item = train_set.sample(start + (i * items) // args.probe_crops, generator)
            crops.append((item["degraded"], item["target"]))
        start += items
    mine, size = crops[env.rank::env.world_size], config.batch_size // env.world_size
    batches = [tuple(map(torch.stack, zip(*mine[i:i + size]))) for i in range(0, len(mine), size)]
    record = EpochRecord(Path(config.out_dir) / "probe_psnr.json", env, fresh=fresh)

    @torch.no_grad()
    def measure() -> float:
        return probe_psnr(net, batches, device=env.device, autocast_dtype=torch.bfloat16 if config.bf16 else None)

    return lambda epoch: record.value(epoch, measure)


# ------------------------------------------------------------------------------------------------ network
def is_self_guided(backbone: str) -> bool:
    """True for the paper's network (a registry name), which has CFE, SGM and PGM inside: it is not wrapped."""
    return issubclass(get_backbone_entry(backbone).cls, PerceiveIRNet)


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The trainable network of ``spec`` (``net.json``), its random weights (frozen random DINOv2 included) seeded by
    ``spec["seed"]``: the same in every process and when ``examples/evaluate.py --run`` rebuilds it."""
    pretrained, tiny = spec["frozen"] == "pretrained", spec["frozen"] == "tiny"
    with seeded_global_rng(spec["seed"]):
        if spec["adapter"]:  # the backbone wrapped in PerceiveAdapter
            backbone = create_backbone(spec["backbone"])
            levels = backbone.decoder_levels()  # {module name: channels}, coarse to fine
            sgm = tiny_sgm(blocks=len(levels)) if tiny else DEFAULT_DINOV2  # a timm name: DINOv2-B/14
            sgm = sgm if spec.get("sgm", True) else None  # older net.json files have no "sgm": they had one
            net = PerceiveAdapter(backbone, levels=levels, sgm=sgm, pgca=spec["pgca"], pad=True,
                                  sgm_kwargs=None if tiny else {"pretrained": pretrained})
        elif tiny:  # the paper's network: CFE, SGM (frozen DINOv2) and PGM are inside it
            sgm = tiny_sgm(blocks=4)
            net = create_backbone(spec["backbone"], dinov2=sgm, semantic_dim=sgm.embed_dim)
        else:
            net = create_backbone(spec["backbone"], dinov2_pretrained=pretrained)
    return set_value_checks(net, False)  # values are checked by the loss; no host read inside the forward


def build_run_net(run_dir: str | Path, weights: str = "auto", checkpoint: str | Path | None = None) -> nn.Module:
    """A finished (or checkpointed) run's network: ``net.json`` rebuilt, its trained weights loaded strictly."""
    spec = read_net_spec(run_dir, NET_FORMAT)
    return load_weights(build_network(spec), run_weights(run_dir, weights, checkpoint)[0])


# ------------------------------------------------------------------------------------------------- losses
def build_criterion(args: argparse.Namespace, perceiver: QualityPerceiver | None = None) -> QualityAwareLoss:
    """L1 + λ1·L_cl + λ2·L_clip + λ3·L_dpl: the stage-1 perceiver (``--perceiver``, or built and passed in) and
    VGG-16; ``--frozen random/tiny`` without a perceiver: untrained prompts (smoke runs and timing only)."""
    if perceiver is not None and args.perceiver:
        raise ValueError("give the perceiver either as --perceiver or as an instance, not both")
    if perceiver is not None and not isinstance(perceiver, QualityPerceiver):
        raise TypeError(f"perceiver must be a QualityPerceiver, got {type(perceiver).__name__}")
    if perceiver is None and args.clip_weight > 0:
        if args.perceiver:
            perceiver = QualityPerceiver.from_pretrained(args.perceiver)
        elif args.frozen == "pretrained":
            raise ValueError("--perceiver is required: the stage-1 output (e.g. runs/stage1/perceiver) or a Hub id; "
                             "pass --clip-weight 0 to train without the CLIP-aware loss")
        else:
            logger.warning("no --perceiver: the CLIP-aware loss uses UNTRAINED prompts (smoke runs and timing only)")
            perceiver = tiny_perceiver() if args.frozen == "tiny" else QualityPerceiver(pretrained=None)  # ViT-B/32
    return QualityAwareLoss(
        perceiver, tiny_vgg() if args.frozen == "tiny" else args.vgg, vgg_pretrained=args.frozen == "pretrained",
        l1_weight=args.l1_weight, contrastive_weight=args.cl_weight, clip_weight=args.clip_weight,
        perceptual_weight=args.dpl_weight, temperature=args.temperature, clip_form=args.clip_form,
        clip_logit_scale=args.clip_logit_scale, difficulty=args.difficulty)


def perceive_loss(net: nn.Module, ddp: nn.Module, criterion: QualityAwareLoss, batch: dict[str, Any], env: DistEnv,
                  logged: Sequence[str], model_psnr: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One step's forward pass and loss: ``(L, {term: value})`` (the module docstring's four lines)."""
    guidance = net.guide(batch["degraded"], positive=batch["positive"])  # Z, Z⁺ and the DINOv2 priors, as a value
    restored = ddp(batch["degraded"], guidance=guidance)  # through DDP: its backward all-reduces the gradients
    if not env.all_true(torch.isfinite(restored).all()):  # decided by all processes, before L_cl's all_gather
        nan = restored.float().sum() * math.nan  # backward still runs everywhere (DDP); the update is skipped
        return nan, dict.fromkeys(logged, nan.detach())
    loss, terms = criterion(restored, batch["target"], batch["degraded"], batch.get("negatives"),
                            batch.get("negative_mask"), guidance=guidance, labels=batch["task"], model_psnr=model_psnr)
    return loss, {name: terms[name] for name in logged}


# --------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None, *, perceiver: QualityPerceiver | None = None) -> dict[str, float]:
    """Parse ``argv``, build everything, train; returns the last validation metrics. ``perceiver``: a built
    stage-1 perceiver in place of ``--perceiver`` (any CLIP)."""
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.frozen, args.backbone = "tiny", args.backbone.removesuffix("-tiny") + "-tiny"
    args.batch_size = args.batch_size or (4 if args.layout == "5task" else 8)
    config: TrainConfig = config_from_args(args)
    with distributed_job(config) as env:  # torchrun's process group (or one process), logs, <out-dir>/train.log
        wrapped = not is_self_guided(args.backbone)
        if args.pgca and not wrapped:
            raise ValueError(f"--pgca applies to adapter-wrapped backbones; {args.backbone} has its own PGCA (ETB)")
        if args.no_sgm and not wrapped:
            raise ValueError(f"--no-sgm applies to adapter-wrapped backbones; {args.backbone} has its SGM inside")
        spec = {"format": NET_FORMAT, "backbone": args.backbone, "adapter": wrapped, "pgca": args.pgca,
                "sgm": not args.no_sgm, "frozen": args.frozen, "seed": config.seed}
        claim_run_folder(Path(config.out_dir), spec, env)  # net.json: how evaluate.py --run rebuilds the network
        dataset, train_set, val_sets = training_data(args, env)
        net = build_network(spec)
        if args.init_backbone:  # official weights into the wrapped backbone (its keys are untouched by the adapter)
            (load_backbone_weights if wrapped else load_checkpoint)(net, args.init_backbone)  # the authors' layout
        unused = freeze_unused_parameters(net)  # layers the forward never calls: DDP needs no find_unused_parameters
        logger.info("%s: %d trainable parameters%s; items per epoch %s", args.backbone,
                    sum(p.numel() for p in net.parameters() if p.requires_grad),
                    f" (frozen, never used: {unused})" if unused else "", train_set.counts())
        if wrapped:
            logger.info("guided levels:\n%s", net.describe())
        with seeded_global_rng(config.seed):  # random frozen CLIP/VGG: the same in every process
            criterion = build_criterion(args, perceiver).to(env.device)
        weights = (criterion.l1_weight, criterion.contrastive_weight, criterion.clip_weight,
                   criterion.perceptual_weight)
        logged = [name for name, weight in zip(TERMS, weights) if weight > 0]  # the same columns at every step
        if args.mix_tasks:
            labels = [train_set.locate(index).task for index in range(len(train_set))]
            sampler = TaskMixingBatchSampler(labels, config.batch_size, steps=config.steps, min_tasks=2,
                                             seed=config.seed, rank=env.rank, world_size=env.world_size,
                                             draw_seeds=True)
        else:
            sampler = ResumableBatchSampler(len(train_set), config.batch_size, rank=env.rank,
                                            world_size=env.world_size, seed=config.seed)
        loader = training_loader(dataset, sampler, config, env)
        record = {"items": len(train_set), "batch": config.batch_size, "seed": config.seed, "mix_tasks": args.mix_tasks}
        with TrainingRun(net, config, env, steps_per_epoch=len(train_set) // config.batch_size,
                         data_record=record) as run:
            device_ids = [env.device.index] if env.device.type == "cuda" else None  # one GPU per process
            ddp = nn.parallel.DistributedDataParallel(net, device_ids=device_ids) if env.distributed else net
            probe = probe_reference(args, config, env, train_set, net, fresh=run.step == 0) \
                if args.difficulty == "probe" else None
            batches = run.batches(loader)
            while run.step < config.steps:
                batch = move_to(next(batches), env.device)
                model_psnr = probe(run.epoch) if probe else None  # the difficulty reference of this epoch
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss, terms = perceive_loss(net, ddp, criterion, batch, env, logged, model_psnr)
                if probe:
                    terms["probe_psnr"] = model_psnr
                loss.backward()
                run.update(loss, terms, torch.nn.utils.clip_grad_norm_(run.parameters, config.grad_clip or math.inf))
                if run.due(config.ckpt_every):
                    run.save()
                if run.due(config.val_every):
                    run.validate(val_sets)
            run.export_weights()
        return run.metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad data, cache, checkpoint or option: the message says what
        sys.exit(f"train_restormer_perceive.py: error: {error}")
