"""The docs' code examples compute what the method says, not just run: each page's ```python blocks run in order
(as a reader would paste them) and their results are compared with method_reference.py or with the inputs they
were computed from. The random inputs an example draws inline are recorded (``torch.rand`` / ``torch.randn``)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import torch

import method_reference as ref

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str, marker: str | None = None) -> list[str]:
    """The page's ```python blocks (only the one after ``<!-- example: marker -->`` when given), without those
    marked "not run in tests" or requiring a module this checkout lacks."""
    text = (DOCS / page).read_text(encoding="utf-8")
    if marker is not None:
        return [re.search(rf"<!-- example: {marker} -->\s*```python\n(.*?)```", text, re.S).group(1)]
    blocks = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        required = re.match(r"# requires: (\S+)", first)
        if "not run in tests" in first or (required and importlib.util.find_spec(required.group(1)) is None):
            continue
        blocks.append(block)
    return blocks


def run_page(page: str, monkeypatch, marker: str | None = None, count: int | None = None
             ) -> tuple[dict, list[torch.Tensor], list[str]]:
    """Run the blocks (the first ``count`` of them, or all) in one namespace; returns it, every tensor drawn by
    torch.rand/randn, and each block's printed text."""
    drawn: list[torch.Tensor] = []
    for name in ("rand", "randn"):
        original = getattr(torch, name)

        def record(*args, _original=original, **kwargs):
            drawn.append(_original(*args, **kwargs))
            return drawn[-1]

        monkeypatch.setattr(torch, name, record)
    torch.manual_seed(0)
    namespace: dict = {}
    printed = []
    for block in python_blocks(page, marker)[:count]:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(block, str(DOCS / page), "exec"), namespace)
        printed.append(output.getvalue())
    monkeypatch.undo()
    return namespace, drawn, printed


def drawn_with_shape(drawn: list[torch.Tensor], *shape: int) -> list[torch.Tensor]:
    return [t for t in drawn if tuple(t.shape) == shape]


def is_flipped_window(view: torch.Tensor, full: torch.Tensor) -> bool:
    """True when ``view (C, h, w)`` is a window of ``full (C, H, W)``, flipped horizontally and/or vertically:
    undo each flip, find the full-image pixels equal to the window's corner, compare the window there."""
    height, width = view.shape[-2:]
    for dims in ([], [-1], [-2], [-1, -2]):
        window = view.flip(dims) if dims else view
        corners = (full == window[:, :1, :1]).all(dim=0).nonzero().tolist()
        if any(torch.equal(full[:, top : top + height, left : left + width], window) for top, left in corners):
            return True
    return False


def comment_lines_after(block: str, statement: str) -> list[str]:
    """The ``#   …`` lines right after ``statement`` in a docs block: the output the page promises."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(statement)) + 1
    promised = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        promised.append(line[1:].rstrip())
    return promised


# ---------------------------------------------------------------------------------------------- pages
def test_cfe_page_embeds_a_crop_and_a_flipped_window_of_the_same_images(monkeypatch):
    namespace, _, printed = run_page("modules/cfe.md", monkeypatch)
    cfe, anchor, positive, full = (namespace[k] for k in ("cfe", "anchor", "positive", "degraded_full"))
    with torch.no_grad():
        torch.testing.assert_close(namespace["z"].double(), ref.cfe_code_form(cfe, anchor), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(namespace["z_pos"].double(), ref.cfe_code_form(cfe, positive), rtol=1e-5,
                                   atol=1e-6)
    assert all(is_flipped_window(positive[i], full[i]) for i in range(full.shape[0]))
    assert printed[0].split("\n")[:2] == ["torch.float32", "images contains NaN or Inf values"]  # named errors
    assert printed[1].strip() == "torch.Size([4, 128]) torch.Size([4, 128])"


def test_sgm_page_priors_are_the_cls_tokens_of_the_chosen_blocks(monkeypatch):
    namespace, drawn, _ = run_page("modules/sgm.md", monkeypatch, count=1)  # the 56-px example
    sgm, vit, out = namespace["sgm"], namespace["vit"], namespace["out"]
    first, second = drawn_with_shape(drawn, 2, 3, 100, 150)
    for got, want in zip(namespace["priors"], ref.dinov2_cls_tokens(vit, first, (1, 2, 3), 56), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(out.cls, ref.dinov2_cls_tokens(vit, second, (1, 2, 3), 56), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [tuple(m.shape) for m in out.maps] == [(2, 32, 100, 150), (2, 32, 50, 75), (2, 32, 25, 38)]
    assert sgm.blocks == (1, 2, 3)


def test_pgm_page_output_is_the_film_of_its_inputs(monkeypatch):
    namespace, drawn, printed = run_page("modules/pgm.md", monkeypatch, count=1)  # the FiLM example
    (x,), (prior,), (z,) = (drawn_with_shape(drawn, *s) for s in ((2, 96, 64, 64), (2, 768), (2, 128)))
    torch.testing.assert_close(namespace["y"].double(), ref.film(namespace["pgm"], x, prior, z), rtol=1e-5,
                               atol=1e-5)
    assert printed[0].strip() == "torch.Size([2, 96, 64, 64])"


def test_pgca_page_runs_two_code_form_etbs_on_one_pgm_output(monkeypatch):
    namespace, drawn, _ = run_page("modules/pgca.md", monkeypatch)
    (x,), (prior,), (z,) = (drawn_with_shape(drawn, *s) for s in ((1, 96, 32, 32), (1, 768), (1, 128)))
    y = ref.film(namespace["pgm"], x, prior, z)
    expected = x.double()
    for etb in namespace["etbs"]:
        expected = ref.etb_code_form(etb, expected, y)
    torch.testing.assert_close(namespace["x"].double(), expected, rtol=1e-4, atol=1e-5)


def test_adapter_page_describes_its_levels_trains_and_saves_only_its_own_weights(monkeypatch):
    from safetensors.torch import load_file

    namespace, _, printed = run_page("adapter.md", monkeypatch)
    blocks = python_blocks("adapter.md")
    # the printed level table is the one the page shows, and the bottleneck gets the deepest block
    promised = comment_lines_after(blocks[0], "print(adapter.describe())")
    assert [line.strip() for line in printed[0].splitlines()] == [line.strip() for line in promised]
    blocks_per_level = [int(re.search(r"block (\d+)$", line).group(1)) for line in printed[0].splitlines()]
    assert blocks_per_level == sorted(blocks_per_level, reverse=True) and blocks_per_level[-1] == 1
    assert printed[2].strip() == "['bottleneck', 'dec1']"
    # the training step: Z and Z⁺ are unit float32 rows, Z⁺ of a flipped window of the whole images
    z, z_pos, positive, full = (namespace[k] for k in ("z", "z_pos", "positive", "degraded_full"))
    assert z.dtype == z_pos.dtype == torch.float32 and z.shape == z_pos.shape == (2, 128)
    torch.testing.assert_close(torch.cat([z, z_pos]).norm(dim=1), torch.ones(4))
    assert all(is_flipped_window(positive[i], full[i]) for i in range(2))
    # the saved file holds exactly the adapter's own weights; the backbone keeps its keys
    saved = load_file(namespace["path"])
    adapter = namespace["adapter"]
    assert saved.keys() == {f"perceive.{k}" for k in adapter.perceive.state_dict()}
    for key, value in saved.items():
        assert torch.equal(value, adapter.state_dict()[key]), key
    assert namespace["backbone_state"].keys() == adapter.backbone.state_dict().keys()
    assert not any(key.startswith("perceive.") for key in namespace["backbone_state"])


def test_negatives_page_reads_back_the_proxy_render_cut_like_the_crop(monkeypatch):
    from perceive_components.ops.io import read_image

    namespace, _, _ = run_page("negatives.md", monkeypatch, marker="render-cache")
    root, proxy, cache = namespace["root"], namespace["proxy"], namespace["cache"]
    key, crop = namespace["key"], namespace["sample"].crop  # the last sample: 60×90, smaller than the crop
    assert crop.resize is not None  # the authors' rule: upscaled before the crop, the render the same way
    with torch.no_grad():  # each stored render is the proxy's output (tiles blend in float, then 8-bit rounding)
        for name, edge in (("rain/0001.png", 0), (key, 1)):  # 60×90 is reflect-padded to 64×96 for the proxy:
            image, stored = read_image(f"{root}/data/{name}"), read_image(cache.entry_path("weak", name))
            difference = (stored - proxy(image[None])[0].clamp(0, 1)).abs()  # its 3×3 conv sees that padding
            assert difference[:, : difference.shape[1] - edge, : difference.shape[2] - edge].max() <= 1 / 255 + 1e-6
    negatives = namespace["negatives"]
    assert negatives.shape == (1, 3, 64, 64) and namespace["valid"].tolist() == [True]
    torch.testing.assert_close(negatives[0], crop.apply(stored), rtol=0, atol=0)
