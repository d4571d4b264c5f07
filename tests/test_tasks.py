"""One task vocabulary: aliases (noise levels are one task), upstream codes, and the same names/ids accepted by
the contrastive loss, the online proxies and the render cache (tests/test_negatives.py covers the cache)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perceive_components.data import PROMPTIR_DE_IDS, STANDARD_TASKS, TaskVocabulary
from perceive_components.losses import DegradationContrastiveLoss
from perceive_components.negatives import ProxyNegatives


def test_standard_vocabulary_maps_upstream_names_onto_one_task():
    assert STANDARD_TASKS.names == ("noise", "haze", "rain", "blur", "lowlight")
    assert {STANDARD_TASKS.id(n) for n in ("noise", "denoise", "denoise_15", "denoise_25", "denoise_50")} == {0}
    assert [STANDARD_TASKS.name(n) for n in ("dehaze", "derain", "deblur", "enhance", 4)] == \
        ["haze", "rain", "blur", "lowlight", "lowlight"]
    assert "derain" in STANDARD_TASKS and "snow" not in STANDARD_TASKS and len(STANDARD_TASKS) == 5
    assert STANDARD_TASKS.id(np.int64(3)) == STANDARD_TASKS.id(torch.tensor(3)) == 3


def test_labels_of_a_batch_from_names_ids_or_upstream_codes():
    expected = [0, 0, 2, 1]
    assert STANDARD_TASKS.labels(["denoise_15", "noise", "derain", "haze"]).tolist() == expected
    assert STANDARD_TASKS.labels(torch.tensor(expected)).tolist() == expected
    de_id = torch.tensor([1, 2, 3, 4])                                # what PromptIR's data set returns
    assert STANDARD_TASKS.labels(de_id, table=PROMPTIR_DE_IDS).tolist() == expected
    folders = STANDARD_TASKS.with_aliases({"Rain100L": "rain", "BSD400": "noise"})
    assert folders.labels(["BSD400", "Rain100L"]).dtype == torch.int64 and folders.id("Rain100L") == 2
    assert folders != STANDARD_TASKS and folders == STANDARD_TASKS.with_aliases({"BSD400": "noise", "Rain100L": "rain"})


def test_unknown_tasks_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown task 'snow': the vocabulary has noise=0, haze=1"):
        STANDARD_TASKS.id("snow")
    with pytest.raises(ValueError, match="task id 5 is outside this vocabulary"):
        STANDARD_TASKS.labels(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"task codes \[9\] are not in the table"):
        STANDARD_TASKS.labels([9], table=PROMPTIR_DE_IDS)
    with pytest.raises(ValueError, match="one per sample, got the string"):
        STANDARD_TASKS.labels("noise")
    with pytest.raises(ValueError, match="alias 'x' points to 'y'"):
        TaskVocabulary(["a"], {"x": "y"})
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        TaskVocabulary(["a", "a"])


def test_contrastive_loss_takes_names_or_ids_alike():
    generator = torch.Generator().manual_seed(0)
    anchor = nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1)
    positive = nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1)
    by_ids = DegradationContrastiveLoss()(anchor, positive, torch.tensor([0, 0, 2, 1]))
    by_names = DegradationContrastiveLoss()(anchor, positive, ["denoise_15", "denoise_50", "derain", "dehaze"])
    assert torch.equal(by_ids, by_names) and by_ids > 0
    own = DegradationContrastiveLoss(vocabulary=TaskVocabulary(["a", "b"]))
    assert torch.equal(own(anchor, positive, ["a", "a", "b", "b"]), own(anchor, positive, torch.tensor([0, 0, 1, 1])))
    with pytest.raises(ValueError, match="unknown task 'derain'"):
        own(anchor, positive, ["derain"] * 4)


def test_online_proxies_take_coverage_and_labels_as_names_or_ids():
    proxies = ProxyNegatives({"fsnet": nn.Identity(), "all": nn.Identity()}, tasks={"fsnet": ["dehaze"]})
    assert proxies.tasks == {"fsnet": (1,), "all": None}
    by_names = proxies.coverage(["haze", "denoise_25", "rain"])
    assert by_names.tolist() == [[True, True], [False, True], [False, True]]
    assert torch.equal(by_names, proxies.coverage(torch.tensor([1, 0, 2])))
    with pytest.raises(ValueError, match="unknown task 'snow'"):
        ProxyNegatives({"p": nn.Identity()}, tasks={"p": ["snow"]})
