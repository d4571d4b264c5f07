"""docs/integrate-basicsr.md, run as written: every block of the page is taken from the page's text and run against
stand-ins of the official Restormer code (swz30/Restormer's BasicSR fork), written here from its source:

- ``basicsr.models.archs``: ``restormer_arch.Restormer`` (this repository's re-implementation, upstream's parameter
  names) and ``define_network`` (pops ``type``, calls it from the ``*_arch`` modules with the other options);
- ``basicsr.models.losses`` (upstream exports its losses there; the page's line is appended);
- ``basicsr.models.image_restoration_model.ImageCleanModel``: networks, EMA, loss by name, AdamW, mixup flag,
  ``feed_train_data``, ``get_bare_model``, ``reduce_loss_dict``, ``model_ema``;
- ``basicsr.data.paired_image_dataset.Dataset_PairedImage``: reads lq and gt, pads bottom/right to ``gt_size`` with
  cv2's BORDER_REFLECT (NumPy's ``symmetric``), draws ``top``, ``left`` (``random.randint``), then the mode
  (``random.randint(0, 7)``), returns RGB CHW patches — upstream's draw order;
- one iteration of ``basicsr/train.py``'s progressive learning (the page's lines are spliced in at the statements
  the page names).

The new files of the page become modules of that package; the YAML block is merged over an upstream-shaped option
file. Networks are tiny (Restormer ``tiny``, a 2-block random DINOv2, the tiny CLIP perceiver and VGG).
"""
from __future__ import annotations

import logging
import os
import random
import re
import sys
import textwrap
import types
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from examples.backbones.restormer import CONFIGS, Restormer
from perceive_components.data import STANDARD_TASKS
from perceive_components.tiny import TINY_DINOV2_KWARGS, TINY_DINOV2_NAME, TINY_DINOV2_SIZE, tiny_perceiver, tiny_vgg

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrate-basicsr.md"
PATCH = 16  # gt_size of the stand-in options
HEADED_BLOCK = re.compile(r"^`([^`\n]+)` — ([^\n]*):\n\n```(python|yaml)\n(.*?)^```", re.M | re.S)
ARCH, LOSSES = "basicsr/models/archs/perceive_restormer_arch.py", "basicsr/models/losses/__init__.py"
MODEL, DATASET = "basicsr/models/perceive_image_restoration_model.py", "basicsr/data/perceive_paired_image_dataset.py"
TRAIN, OPTIONS = "basicsr/train.py", "AllInOne/Options/PerceiveRestormer.yml"
# (name, (height, width)) per task: normal, smaller than the patch on both sides, on one side
IMAGES = {"rain": [("rain-1.png", (24, 40)), ("rain-2.png", (10, 12)), ("rain-3.png", (12, 30))],
          "haze": [("haze-1.png", (20, 20)), ("haze-2.png", (9, 26))]}
EVAL_IMAGE = ("Datasets/test/rain/input/1.png", (20, 27))  # not a multiple of 8


@dataclass(frozen=True)
class Block:
    path: str   # the file the block goes into, as the page names it
    where: str  # "new file", "at the end", "after `…`", "replacing `…`", or what a script is for
    language: str
    code: str


def page_blocks(text: str) -> list[Block]:
    return [Block(*match) for match in HEADED_BLOCK.findall(text)]


def the_block(blocks: list[Block], path: str) -> Block:
    found = [block for block in blocks if block.path == path]
    assert len(found) == 1, f"the page should have one block for {path}, found {len(found)}"
    return found[0]


def splice(source: str, fragments: list[Block]) -> str:
    """``source`` with each fragment inserted after, or in place of, the one line that is the statement it names
    (re-indented to that line), or appended for "at the end"."""
    for fragment in fragments:
        code = textwrap.dedent(fragment.code)
        if fragment.where == "at the end":
            source += code
            continue
        place = re.match(r"(after|replacing) `([^`]+)`", fragment.where)
        assert place, f"unknown place {fragment.where!r} for {fragment.path}"
        lines = source.splitlines(keepends=True)
        hits = [index for index, line in enumerate(lines) if line.strip() == place.group(2)]
        assert len(hits) == 1, f"{place.group(2)!r} should occur once in the stand-in {fragment.path}"
        line = lines[hits[0]]
        indented = textwrap.indent(code, line[: len(line) - len(line.lstrip())])
        keep = hits[0] + 1 if place.group(1) == "after" else hits[0]
        source = "".join(lines[:keep] + [indented] + lines[hits[0] + 1:])
    return source


# ---------------------------------------------------------------------------------------------------- stand-ins
TRAIN_LOOP = """
def progressive_iteration(model, train_data, batch_size, mini_batch_size, gt_size, mini_gt_size, scale=1):
    lq = train_data['lq']
    gt = train_data['gt']
    if mini_batch_size < batch_size:
        indices = random.sample(range(0, batch_size), k=mini_batch_size)
        lq = lq[indices]
        gt = gt[indices]
    if mini_gt_size < gt_size:
        x0 = int((gt_size - mini_gt_size) * random.random())
        y0 = int((gt_size - mini_gt_size) * random.random())
        x1 = x0 + mini_gt_size
        y1 = y0 + mini_gt_size
        lq = lq[:,:,x0:x1,y0:y1]
        gt = gt[:,:,x0*scale:x1*scale,y0*scale:y1*scale]
    model.feed_train_data({'lq': lq, 'gt':gt})
"""
LOSSES_INIT = "from torch.nn import L1Loss, MSELoss\n"


def read_bgr(path: str) -> np.ndarray:
    """``imfrombytes(..., float32=True)``: (H, W, 3) BGR float32 in [0, 1]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[..., ::-1].astype(np.float32) / 255.0


def dihedral(image: np.ndarray, mode: int) -> np.ndarray:
    """Restormer's ``data_augmentation``: ``np.rot90`` by mode // 2, then ``np.flipud`` for odd modes."""
    turned = np.rot90(image, k=mode // 2)
    return np.flipud(turned) if mode % 2 else turned


class Dataset_PairedImage(torch.utils.data.Dataset):  # noqa: N801 (upstream's name)
    """Upstream's training ``__getitem__``: read, pad to gt_size (BORDER_REFLECT), top, left, mode, RGB CHW."""

    def __init__(self, opt):
        self.opt, self.file_client, self.io_backend_opt = opt, None, opt["io_backend"]
        self.gt_folder, self.lq_folder = opt["dataroot_gt"], opt["dataroot_lq"]
        self.paths = [{"lq_path": os.path.join(self.lq_folder, name), "gt_path": os.path.join(self.gt_folder, name)}
                      for name in sorted(os.listdir(self.gt_folder))]
        if opt["phase"] == "train":
            self.geometric_augs = opt["geometric_augs"]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.file_client is None:
            self.file_client = self.io_backend_opt.pop("type")  # upstream pops it from the options it was given
        paths = self.paths[index % len(self.paths)]
        img_gt, img_lq = read_bgr(paths["gt_path"]), read_bgr(paths["lq_path"])
        size = self.opt["gt_size"]
        pad = ((0, max(0, size - img_lq.shape[0])), (0, max(0, size - img_lq.shape[1])), (0, 0))
        img_gt, img_lq = np.pad(img_gt, pad, mode="symmetric"), np.pad(img_lq, pad, mode="symmetric")
        top = random.randint(0, img_lq.shape[0] - size)
        left = random.randint(0, img_lq.shape[1] - size)
        img_gt, img_lq = (image[top:top + size, left:left + size] for image in (img_gt, img_lq))
        if self.geometric_augs:
            mode = random.randint(0, 7)
            img_gt, img_lq = dihedral(img_gt, mode), dihedral(img_lq, mode)
        img_gt, img_lq = (torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))
                          for image in (img_gt, img_lq))
        return {"lq": img_lq, "gt": img_gt, "lq_path": paths["lq_path"], "gt_path": paths["gt_path"]}


class ImageCleanModel:
    """Upstream's model, as far as training goes, on the CPU without DDP."""

    def __init__(self, opt):
        self.opt, self.device, self.is_train = opt, torch.device("cpu"), opt["is_train"]
        self.mixing_flag = opt["train"]["mixing_augs"].get("mixup", False)
        archs = sys.modules["basicsr.models.archs"]
        self.net_g = archs.define_network(deepcopy(opt["network_g"]))
        if self.is_train:
            self.init_training_settings()

    def init_training_settings(self):
        archs, losses = sys.modules["basicsr.models.archs"], sys.modules["basicsr.models.losses"]
        self.net_g.train()
        train_opt = self.opt["train"]
        self.ema_decay = train_opt.get("ema_decay", 0)
        if self.ema_decay > 0:
            self.net_g_ema = archs.define_network(self.opt["network_g"])
            self.model_ema(0)
            self.net_g_ema.eval()
        pixel_type = train_opt["pixel_opt"].pop("type")
        self.cri_pix = getattr(losses, pixel_type)(**train_opt["pixel_opt"]).to(self.device)
        optim_opt = dict(train_opt["optim_g"])
        assert optim_opt.pop("type") == "AdamW"
        self.optimizer_g = torch.optim.AdamW([p for p in self.net_g.parameters() if p.requires_grad], **optim_opt)

    def feed_train_data(self, data):
        self.lq = data["lq"].to(self.device)
        if "gt" in data:
            self.gt = data["gt"].to(self.device)
        if self.mixing_flag:  # upstream's mixup: blend with a permutation of the batch
            lam, order = 0.7, torch.randperm(self.lq.shape[0])
            self.gt, self.lq = lam * self.gt + (1 - lam) * self.gt[order], lam * self.lq + (1 - lam) * self.lq[order]

    def get_bare_model(self, net):
        return net.module if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else net

    def model_ema(self, decay=0.999):
        net_g = dict(self.get_bare_model(self.net_g).named_parameters())
        for name, parameter in self.net_g_ema.named_parameters():
            parameter.data.mul_(decay).add_(net_g[name].data, alpha=1 - decay)

    def reduce_loss_dict(self, loss_dict):
        with torch.no_grad():
            return {name: value.mean().item() for name, value in loss_dict.items()}

    def save_latest(self):
        """``BaseModel.save_network([net_g, net_g_ema], 'net_g', -1, ['params', 'params_ema'])``."""
        folder = Path("experiments", self.opt["name"], "models")
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"params": self.get_bare_model(self.net_g).state_dict(), "params_ema": self.net_g_ema.state_dict()},
                   folder / "net_g_latest.pth")


def module(name: str, **attributes) -> types.ModuleType:
    made = types.ModuleType(name)
    made.__dict__.update(attributes)
    return made


def run_as_module(name: str, code: str, origin: str, register=None) -> types.ModuleType:
    """``code`` run as module ``name``; ``register(name, module)`` first puts it where imports find it."""
    made = module(name, __file__=origin)
    if register is not None:
        register(name, made)
    exec(compile(code, origin, "exec"), made.__dict__)
    return made


def install_basicsr(blocks: list[Block], register) -> types.SimpleNamespace:
    """The stand-in ``basicsr`` package, each module given to ``register(name, module)`` (e.g. a monkeypatched
    ``sys.modules``), with the page's files and lines in it."""
    arch_modules = [module("basicsr.models.archs.restormer_arch", Restormer=Restormer)]

    def define_network(opt):
        network_type = opt.pop("type")
        for arch in arch_modules:
            if hasattr(arch, network_type):
                return getattr(arch, network_type)(**opt)
        raise ValueError(f"{network_type} is not found.")

    for name, made in {
        "basicsr": module("basicsr"), "basicsr.utils": module("basicsr.utils",
                                                              get_root_logger=lambda: logging.getLogger("basicsr")),
        "basicsr.models": module("basicsr.models"),
        "basicsr.models.archs": module("basicsr.models.archs", define_network=define_network),
        "basicsr.models.archs.restormer_arch": arch_modules[0],
        "basicsr.models.image_restoration_model": module("basicsr.models.image_restoration_model",
                                                         ImageCleanModel=ImageCleanModel),
        "basicsr.data": module("basicsr.data"),
        "basicsr.data.paired_image_dataset": module("basicsr.data.paired_image_dataset",
                                                    Dataset_PairedImage=Dataset_PairedImage),
    }.items():
        register(name, made)
    losses_code = splice(LOSSES_INIT, [block for block in blocks if block.path == LOSSES])
    train_code = "import random\n" + splice(TRAIN_LOOP, [block for block in blocks if block.path == TRAIN])
    arch_modules.append(run_as_module("basicsr.models.archs.perceive_restormer_arch", the_block(blocks, ARCH).code,
                                      f"{PAGE.name}: {ARCH}", register))
    return types.SimpleNamespace(
        losses=run_as_module("basicsr.models.losses", losses_code, f"{PAGE.name}: {LOSSES}", register),
        models=run_as_module("basicsr.models.perceive_image_restoration_model", the_block(blocks, MODEL).code,
                             f"{PAGE.name}: {MODEL}", register),
        data=run_as_module("basicsr.data.perceive_paired_image_dataset", the_block(blocks, DATASET).code,
                           f"{PAGE.name}: {DATASET}", register),
        train=run_as_module("basicsr.train", train_code, f"{PAGE.name}: {TRAIN}", register),
        define_network=define_network)


def upstream_options() -> dict:
    """An option file shaped like upstream's Deraining_Restormer.yml as ``parse`` returns it, tiny."""
    return {
        "name": "Deraining_Restormer", "model_type": "ImageCleanModel", "scale": 1, "num_gpu": 0, "is_train": True,
        "dist": False,
        "datasets": {"train": {
            "name": "TrainSet", "type": "Dataset_PairedImage", "phase": "train", "scale": 1,
            "dataroot_gt": "./Datasets/train/Rain13K/target", "dataroot_lq": "./Datasets/train/Rain13K/input",
            "geometric_augs": True, "filename_tmpl": "{}", "io_backend": {"type": "disk"}, "use_shuffle": True,
            "num_worker_per_gpu": 0, "batch_size_per_gpu": 2, "mini_batch_sizes": [2], "iters": [10],
            "gt_size": PATCH, "gt_sizes": [PATCH], "dataset_enlarge_ratio": 1, "prefetch_mode": None}},
        "network_g": {"type": "Restormer", **{key: list(value) if isinstance(value, tuple) else value
                                              for key, value in CONFIGS["tiny"].items()}},
        "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None},
        "train": {"total_iter": 10, "warmup_iter": -1, "use_grad_clip": True, "ema_decay": 0.999,
                  "mixing_augs": {"mixup": False, "mixup_beta": 1.2, "use_identity": True},
                  "optim_g": {"type": "AdamW", "lr": 3e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999]},
                  "pixel_opt": {"type": "L1Loss", "loss_weight": 1, "reduction": "mean"}},
    }


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def write_random_image(path: str | Path, size: tuple[int, int], generator: np.random.Generator) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(generator.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def exec_script(block: Block, **names) -> dict:
    namespace = {"__name__": block.path.removesuffix(".py"), **names}
    exec(compile(block.code, f"{PAGE.name}: {block.path}", "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def page():
    return page_blocks(PAGE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workspace(page, tmp_path_factory):
    """A folder with the page's option file (merged over upstream's, tiny networks), the data it names, an official
    Restormer checkpoint where ``backbone_weights`` points, and the render cache made by the page's script."""
    root = tmp_path_factory.mktemp("restormer")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        torch.manual_seed(0)
        basicsr = install_basicsr(page, lambda name, made: patch.setitem(sys.modules, name, made))
        opt = merged(upstream_options(), yaml.safe_load(the_block(page, OPTIONS).code))
        opt["network_g"]["perceive"].update(sgm=TINY_DINOV2_NAME, sgm_kwargs={
            "pretrained": False, "image_size": TINY_DINOV2_SIZE, "model_kwargs": dict(TINY_DINOV2_KWARGS)})
        Path(OPTIONS).parent.mkdir(parents=True)
        Path(OPTIONS).write_text(yaml.safe_dump(opt, sort_keys=False), encoding="utf-8")

        generator = np.random.default_rng(0)
        for task, entry in opt["datasets"]["train"]["tasks"].items():
            for name, size in IMAGES[task]:
                write_random_image(Path(entry["dataroot_lq"], name), size, generator)
                write_random_image(Path(entry["dataroot_gt"], name), size, generator)
        write_random_image(EVAL_IMAGE[0], EVAL_IMAGE[1], generator)
        official = Restormer(**CONFIGS["tiny"]).state_dict()
        Path(opt["network_g"]["backbone_weights"]).parent.mkdir(parents=True)
        torch.save({"params": official}, opt["network_g"]["backbone_weights"])

        proxies = {"identity": (nn.Identity(), None), "rain_only": (nn.Identity(), ["rain"])}
        exec_script(the_block(page, "render_proxies.py"), proxies=proxies)
        yield types.SimpleNamespace(opt=opt, basicsr=basicsr, official=official)


def train_options(opt: dict) -> dict:
    """The page's options with the tiny frozen networks of the loss (objects: not written to the YAML file)."""
    out = deepcopy(opt)
    out["train"]["pixel_opt"].update(perceiver=tiny_perceiver(), vgg=tiny_vgg(), vgg_pretrained=False)
    return out


def by_name(module: types.ModuleType, name: str):
    """What BasicSR's lookup by name finds: the page's YAML names must be the page's classes."""
    assert hasattr(module, name), f"the YAML names {name!r}, which the page's {module.__name__} does not define"
    return getattr(module, name)


def dataset_options(opt: dict, task: str) -> dict:
    train = deepcopy(opt["datasets"]["train"])
    return {**train, **train["tasks"][task], "task": task}


@pytest.fixture(scope="module")
def trained(workspace):
    """One ``optimize_parameters`` step on a batch of a rain and a haze sample, then the latest checkpoint."""
    torch.manual_seed(0)
    random.seed(0)
    opt = train_options(workspace.opt)
    model = by_name(workspace.basicsr.models, opt["model_type"])(opt)
    dataset = by_name(workspace.basicsr.data, opt["datasets"]["train"]["type"])(opt["datasets"]["train"])
    batch = default_collate([dataset[0], dataset[len(IMAGES["rain"])]])
    assert batch["task"].tolist() == [STANDARD_TASKS.id("rain"), STANDARD_TASKS.id("haze")]
    workspace.basicsr.train.progressive_iteration(model, batch, batch_size=2, mini_batch_size=2, gt_size=PATCH,
                                                  mini_gt_size=PATCH)
    before = {name: p.detach().clone() for name, p in model.net_g.named_parameters()}
    ema_before = {name: p.detach().clone() for name, p in model.net_g_ema.named_parameters()}
    model.optimize_parameters(1)
    model.save_latest()
    return types.SimpleNamespace(model=model, before=before, ema_before=ema_before)


# ---------------------------------------------------------------------------------------------------- the page
def test_every_block_is_headed_and_the_count_matches_the_blocks(page):
    text = PAGE.read_text(encoding="utf-8")
    assert len(page) == len(re.findall(r"^```(?:python|yaml)$", text, re.M)), "a code block without its file line"
    lines: dict[str, int] = {}
    for block in page:
        if block.path.startswith(("basicsr/", "AllInOne/")):
            lines[block.path] = lines.get(block.path, 0) + len(block.code.splitlines())
    table = dict(re.findall(r"^\| `([^`]+)` \| (\d+)", text, re.M))
    assert {path: int(count) for path, count in table.items()} == lines
    total = re.search(r"^\| \*\*total\*\* \| \*\*(\d+)\*\* \|", text, re.M)
    assert total and int(total.group(1)) == sum(lines.values())
    readme = (PAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"(docs/{PAGE.name}) ({total.group(1)} lines)" in readme, "README's link states another count"
    assert {block.path for block in page if block.where == "new file"} == {ARCH, MODEL, DATASET}


# ---------------------------------------------------------------------------------------------------- geometry
def check_replayed_geometry(dataset, draws: int = 800) -> None:
    """Every sample's identity-proxy negative equals its lq patch exactly; every image shows all 8 modes."""
    random.seed(1)
    modes: dict[str, set] = {}
    for draw in range(draws):
        index = draw % len(dataset)
        state = random.getstate()
        sample = dataset[index]
        height, width = read_bgr(sample["lq_path"]).shape[:2]
        crop = dataset.drawn_crop(state, (height, width))
        assert torch.equal(sample["negatives"][0], sample["lq"]), (sample["lq_path"], crop)
        modes.setdefault(sample["lq_path"], set()).add((crop.vflip, crop.rot90))
        if draw >= 8 * len(dataset) and all(len(seen) == 8 for seen in modes.values()):
            break
    assert {path: len(seen) for path, seen in modes.items()} == {path: 8 for path in modes}


def test_replayed_crop_reads_negatives_equal_to_the_lq_patch_for_every_mode_and_small_images(workspace):
    dataset = workspace.basicsr.data.Dataset_PerceivePairedImage(dataset_options(workspace.opt, "rain"))
    assert any(min(size) < PATCH for _, size in IMAGES["rain"])
    check_replayed_geometry(dataset)
    sample = dataset[0]
    assert sample["mask"].tolist() == [True, True] and sample["task"] == STANDARD_TASKS.id("rain")
    assert sample["positive"].shape == sample["lq"].shape
    haze = workspace.basicsr.data.Dataset_PerceivePairedImage(dataset_options(workspace.opt, "haze"))
    assert haze[0]["mask"].tolist() == [True, False], "the rain-only proxy covers no haze image"


def test_reflect_101_padding_instead_of_cv2_reflect_misaligns_small_images(workspace, page):
    code = the_block(page, DATASET).code
    assert code.count("padding='symmetric'") == 1
    wrong = run_as_module("page_dataset_with_reflect_101", code.replace("padding='symmetric'", "padding='reflect'"),
                          "mutated dataset")
    dataset = wrong.Dataset_PerceivePairedImage(dataset_options(workspace.opt, "rain"))
    dataset.paths = [path for path in dataset.paths if path["lq_path"].endswith("rain-2.png")]  # 10×12 < 16×16
    with pytest.raises(RuntimeError, match="replayed crop does not give the lq patch"):
        check_replayed_geometry(dataset, draws=64)


def test_the_replay_leaves_upstreams_random_stream_as_it_was(workspace):
    opt = dataset_options(workspace.opt, "rain")
    plain = Dataset_PairedImage(deepcopy(opt))
    perceive = workspace.basicsr.data.Dataset_PerceivePairedImage(deepcopy(opt))
    random.seed(5)
    expected = [plain[i % 3]["lq"] for i in range(6)]
    random.seed(5)
    got = [perceive[i % 3]["lq"] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# ---------------------------------------------------------------------------------------------------- network
def test_official_checkpoint_loads_into_the_wrapped_restormer_and_the_levels_are_logged(workspace, caplog):
    with caplog.at_level(logging.INFO, logger="basicsr"):
        net = workspace.basicsr.define_network(deepcopy(workspace.opt["network_g"]))
    backbone = net.backbone.state_dict()
    assert backbone.keys() == workspace.official.keys()
    assert all(torch.equal(backbone[key], value) for key, value in workspace.official.items())
    logged = [record.getMessage() for record in caplog.records if record.name == "basicsr"]
    assert any(net.describe() in message for message in logged)
    assert [level.name for level in net.levels] == ["latent", "decoder_level3", "decoder_level2", "decoder_level1"]


def test_mixup_is_refused_before_anything_is_built(workspace):
    opt = deepcopy(workspace.opt)
    opt["train"]["mixing_augs"]["mixup"] = True
    with pytest.raises(ValueError, match="mixup"):
        workspace.basicsr.models.PerceiveImageCleanModel(opt)


# ---------------------------------------------------------------------------------------------------- training
def test_one_step_on_two_tasks_logs_finite_terms_and_a_contrastive_term(trained):
    log = trained.model.log_dict
    assert set(log) == {"l_l1", "l_contrastive", "l_clip", "l_perceptual", "l_total"}
    assert all(np.isfinite(value) for value in log.values()), log
    assert log["l_contrastive"] > 0
    net = trained.model.net_g
    assert any(not torch.equal(p, trained.before[name]) for name, p in net.named_parameters())
    gradient_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()
                                                          if p.grad is not None]))
    assert gradient_norm <= 0.01 * (1 + 1e-4), "use_grad_clip: clip_grad_norm_(…, 0.01)"
    ema = dict(trained.model.net_g_ema.named_parameters())
    assert any(not torch.equal(ema[name], value) for name, value in trained.ema_before.items()), "no EMA update"


def test_progressive_learning_cut_keeps_the_negatives_aligned(workspace):
    class Recorder:
        def feed_train_data(self, data):
            self.data = data

    opt = workspace.opt
    dataset = by_name(workspace.basicsr.data, opt["datasets"]["train"]["type"])(deepcopy(opt["datasets"]["train"]))
    random.seed(3)
    batch = default_collate([dataset[index] for index in range(len(dataset))])
    recorder = Recorder()
    workspace.basicsr.train.progressive_iteration(recorder, batch, batch_size=len(dataset), mini_batch_size=3,
                                                  gt_size=PATCH, mini_gt_size=8)
    data = recorder.data
    assert data["lq"].shape == data["positive"].shape == (3, 3, 8, 8)
    assert data["negatives"].shape == (3, 2, 3, 8, 8) and data["mask"].shape == (3, 2)
    assert torch.equal(data["negatives"][:, 0], data["lq"]), "identity-proxy negatives no longer match lq"
    assert data["mask"][:, 1].tolist() == (data["task"] == STANDARD_TASKS.id("rain")).tolist()


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_exported_backbone_loads_strictly_into_a_bare_restormer(workspace, trained, page):
    exec_script(the_block(page, "export_backbone.py"))
    exported = torch.load("perceive_restormer_backbone.pth", weights_only=True)
    bare = Restormer(**CONFIGS["tiny"])
    bare.load_state_dict(exported["params"], strict=True)
    trained_backbone = trained.model.net_g_ema.backbone.state_dict()
    assert all(torch.equal(value, trained_backbone[key]) for key, value in bare.state_dict().items())


def test_evaluation_block_runs_the_guided_network_with_the_trained_weights(workspace, trained, page):
    names = exec_script(the_block(page, "evaluate_perceive.py"))
    saved = trained.model.net_g_ema.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in names["net"].state_dict().items())
    assert names["restored"].shape == (1, 3, *EVAL_IMAGE[1]) and torch.isfinite(names["restored"]).all()
    assert Path("1_restored.png").is_file()
