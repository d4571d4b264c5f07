"""scan_images: every bad file named at once, parallel, and a cache that skips files already known good."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from perceive_components.data import scan as scan_module
from perceive_components.data.scan import ImageScanError, scan_images


def write_good(folder, count: int) -> list:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"good{index}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_bad(folder) -> dict:
    """Four ways a file fails: not an image, cut short, a flipped pixel-data byte (checksum), missing."""
    good = write_good(folder / "src", 1)[0].read_bytes()
    (folder / "text.png").write_text("not an image")
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[good.index(b"IDAT") + 20] ^= 0xFF
    (folder / "flipped.png").write_bytes(bytes(flipped))
    return {folder / "text.png": "cannot identify image file", folder / "cut.png": "truncated",
            folder / "flipped.png": "checksum", folder / "missing.png": "file not found"}


@pytest.fixture()
def counted(monkeypatch):
    """Count full checks (open + verify + decode) per file name."""
    calls = []
    original = scan_module.check_image_file

    def counting(path):
        calls.append(str(path).rsplit("/", 1)[-1])
        original(path)

    monkeypatch.setattr(scan_module, "check_image_file", counting)
    return calls


def test_every_bad_file_is_listed_with_its_reason(tmp_path, counted):
    good = write_good(tmp_path, 3)
    bad = write_bad(tmp_path)
    with pytest.raises(ImageScanError) as info:
        scan_images([*good, *bad, good[0]], workers=3)  # the duplicate is checked once
    problems = dict(info.value.problems)
    assert set(problems) == {str(path) for path in bad}
    for path, pattern in bad.items():
        assert re.search(pattern, problems[str(path)], re.IGNORECASE), problems
    assert "4 of 7 image file(s)" in str(info.value) and "flipped.png" in str(info.value)
    assert sorted(counted) == sorted(["good0.png", "good1.png", "good2.png", "text.png", "cut.png", "flipped.png"])


def test_the_cache_skips_unchanged_good_files_and_rechecks_changed_ones(tmp_path, counted):
    good = write_good(tmp_path, 4)
    cache = tmp_path / "cache" / "scan.json"
    first = scan_images(good, cache=cache, workers=2)
    assert (first.total, first.decoded, first.cached) == (4, 4, 0) and len(counted) == 4
    stored = json.loads(cache.read_text())
    assert set(stored["good"]) == {str(path) for path in good}

    counted.clear()
    second = scan_images(good, cache=cache)
    assert (second.decoded, second.cached) == (0, 4) and counted == []  # nothing decoded again

    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(good[1])  # changed: size and time differ
    good[2].write_text("now broken")
    with pytest.raises(ImageScanError, match="good2.png"):
        scan_images(good, cache=cache)
    assert sorted(counted) == ["good1.png", "good2.png"]
    assert set(json.loads(cache.read_text())["good"]) == {str(good[0]), str(good[1]), str(good[3])}

    cache.write_text("{ not json")  # an unreadable cache is ignored and rewritten
    counted.clear()
    assert scan_images([good[0]], cache=cache).decoded == 1 and counted == ["good0.png"]
    assert json.loads(cache.read_text())["format"] == scan_module.CACHE_FORMAT


def test_scan_arguments(tmp_path):
    assert scan_images([]).total == 0
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        scan_images(write_good(tmp_path, 1), workers=0)
