"""
Audio and datasets for Seal: reading and resampling audio, synthetic speech, and the
datasets the models train and evaluate on.

A speech model sees a waveform: a 1-D float32 tensor of samples in [-1, 1] at 16 kHz, mono.
Everything in this file exists to turn files on disk (or text, for synthetic speech) into
exactly that, and to batch such waveforms for the models.

Sections, top to bottom:
1. Audio files: a WAV reader written with the standard library and numpy (8/16/24/32-bit PCM,
   32/64-bit float, WAVE_FORMAT_EXTENSIBLE), FLAC through the optional `soundfile`, and checks
   that turn bad files (empty, truncated, NaN, absurdly long...) into clear errors.
2. A band-limited resampler (windowed-sinc, polyphase) in torch, so any rate becomes 16 kHz.
3. Synthetic speech: espeak-ng (shipped by the pip package `espeakng-loader`) called through
   ctypes. Voices (accent x variant x rate x pitch x gain x noise) play the role of speakers.
4. Command grammars in our own words: FSC-style (the 31 real (action, object, location)
   intents) and SLURP-style (scenario_action intents with slots). One grammar feeds both the
   speech corpus and the text corpus of the micro world (section 8).
5. A generator that writes synthetic FSC and SLURP sets in the exact real on-disk layouts, so
   the real loaders read them and nothing special-cases synthetic data.
6. Datasets: FluentSpeechCommands, Slurp, LibriSpeech, Manifest. Every item is a dict
   {wav, text, label, speaker, path}.
7. Batching: `pad_batch` (right-pads and returns lengths; waveforms to a multiple of
   WAV_PAD_MULTIPLE samples, for speed), a length-bucketed batch sampler (seeded, epoch-dependent,
   shardable across ranks) and `collate`, which pads dataset items and returns lengths.
8. The micro world's text corpus (`LMCorpus`): the documents its tiny LM learns in-context
   learning from, cut into the same segments as the prompts of seal.py and fewshot.py.
9. MFCC features in torch, the targets of HuBERT-style pre-training in the micro world.
10. The command line: `python data.py synth --out DIR`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import struct
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

# The encoder fixes the audio format: 16 kHz mono, one frame per 320 samples, each seeing 400.
from encoder import HOP_LENGTH, RECEPTIVE_FIELD, SAMPLE_RATE

log = logging.getLogger("seal.data")

MAX_SECONDS = 60.0            # longer clips are rejected: commands are seconds long, and a
                              # 10-minute file is almost always a mistake (a whole session)
ESPEAK_RATE = 22_050          # espeak-ng's native output rate


class AudioError(ValueError):
    """A file that cannot be turned into a valid waveform. The message names the file."""


# ----------------------------------------------------------------------------------------------
# 1. Audio files
# ----------------------------------------------------------------------------------------------

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE   # the real format is the first 2 bytes of the SubFormat GUID
PCM_WIDTHS = (8, 16, 24, 32)      # bits per sample we read as integers
FLOAT_WIDTHS = (32, 64)


@dataclass
class WavHeader:
    """What the `fmt ` chunk says, plus where the samples are."""
    format_tag: int        # WAVE_FORMAT_PCM or WAVE_FORMAT_IEEE_FLOAT (EXTENSIBLE resolved)
    channels: int
    sample_rate: int
    bits: int
    data_offset: int       # byte offset of the first sample
    num_frames: int        # samples per channel


def _parse_wav_header(path: Path, f) -> WavHeader:
    """Walk the RIFF chunks. The stdlib `wave` module rejects float WAVs, so we do it ourselves.

    Layout: "RIFF" <u32 size> "WAVE", then chunks of <4-byte id> <u32 size> <payload, padded to
    even length>. We need `fmt ` (format) and `data` (samples); everything else is skipped.
    """
    riff = f.read(12)
    if len(riff) == 0:
        raise AudioError(f"{path}: empty file")
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a WAV file (expected a 'RIFF....WAVE' header, got {riff[:12]!r})")
    fmt = None
    file_size = os.fstat(f.fileno()).st_size
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            raise AudioError(f"{path}: truncated or corrupt WAV: no 'data' chunk found")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            body = f.read(size + (size & 1))
            if size < 16 or len(body) < 16:
                raise AudioError(f"{path}: corrupt WAV: 'fmt ' chunk of {size} bytes (expected >= 16)")
            tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == WAVE_FORMAT_EXTENSIBLE:
                if size < 40:
                    raise AudioError(f"{path}: corrupt WAV: extensible 'fmt ' chunk of {size} bytes (expected 40)")
                tag = struct.unpack("<H", body[24:26])[0]  # SubFormat GUID starts with the tag
            fmt = (tag, channels, rate, bits, block_align)
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{path}: corrupt WAV: 'data' chunk before the 'fmt ' chunk")
            tag, channels, rate, bits, block_align = fmt
            if tag == WAVE_FORMAT_PCM and bits not in PCM_WIDTHS or \
               tag == WAVE_FORMAT_IEEE_FLOAT and bits not in FLOAT_WIDTHS:
                raise AudioError(f"{path}: unsupported sample width {bits} bits for "
                                 f"{'PCM' if tag == WAVE_FORMAT_PCM else 'float'} "
                                 f"(supported: PCM {PCM_WIDTHS}, float {FLOAT_WIDTHS})")
            if tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
                raise AudioError(f"{path}: unsupported WAV encoding 0x{tag:04x} (only PCM and IEEE float)")
            if channels < 1 or rate < 1 or block_align != channels * bits // 8:
                raise AudioError(f"{path}: corrupt WAV header: channels={channels} rate={rate} "
                                 f"block_align={block_align} bits={bits}")
            offset = f.tell()
            available = file_size - offset
            if size > available:
                raise AudioError(f"{path}: truncated WAV: header declares {size} bytes of samples, "
                                 f"file holds {available}")
            if size % block_align:
                raise AudioError(f"{path}: truncated WAV: {size} bytes of samples is not a whole "
                                 f"number of {block_align}-byte frames")
            return WavHeader(tag, channels, rate, bits, offset, size // block_align)
        else:
            f.seek(size + (size & 1), os.SEEK_CUR)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV file. Returns (samples (frames, channels) float32 in [-1, 1], sample_rate)."""
    path = Path(path)
    with open(path, "rb") as f:
        h = _parse_wav_header(path, f)
        f.seek(h.data_offset)
        raw = f.read(h.num_frames * h.channels * h.bits // 8)
    if h.format_tag == WAVE_FORMAT_IEEE_FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if h.bits == 32 else "<f8").astype(np.float32)
    elif h.bits == 8:   # 8-bit WAV is unsigned, centred on 128
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif h.bits == 24:  # 3 little-endian bytes: place them in the top of an int32, low byte 0
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        x32 = np.zeros((b.shape[0], 4), dtype=np.uint8)
        x32[:, 1:] = b
        x = x32.view("<i4").reshape(-1).astype(np.float32) / 2.0**31
    else:               # 16 or 32-bit signed
        x = np.frombuffer(raw, dtype=f"<i{h.bits // 8}").astype(np.float32) / 2.0 ** (h.bits - 1)
    return x.reshape(-1, h.channels), h.sample_rate


def write_wav(path: str | Path, wav: torch.Tensor | np.ndarray, sr: int = SAMPLE_RATE,
              bits: int = 16, float_format: bool = False) -> None:
    """Write a mono (S,) or multi-channel (S, C) waveform in [-1, 1] as a WAV file.

    PCM at 8/16/24/32 bits (default 16, like FSC), or IEEE float at 32/64 bits when
    `float_format`. Values outside [-1, 1] are clipped for PCM.
    """
    x = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    x = x.reshape(x.shape[0], -1).astype(np.float64)   # (S, C)
    channels = x.shape[1]
    if float_format:
        if bits not in FLOAT_WIDTHS:
            raise ValueError(f"float WAV needs bits in {FLOAT_WIDTHS}, got {bits}")
        data, tag = x.astype("<f4" if bits == 32 else "<f8").tobytes(), WAVE_FORMAT_IEEE_FLOAT
    else:
        if bits not in PCM_WIDTHS:
            raise ValueError(f"PCM WAV needs bits in {PCM_WIDTHS}, got {bits}")
        scale = 2.0 ** (bits - 1)
        q = np.clip(np.round(x * scale), -scale, scale - 1).astype(np.int64)
        if bits == 8:
            data = (q + 128).astype(np.uint8).tobytes()
        elif bits == 24:
            data = q.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            data = q.astype(f"<i{bits // 8}").tobytes()
        tag = WAVE_FORMAT_PCM
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, sr, sr * block_align, block_align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + \
        b"data" + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # FLAC is optional: only SLURP and LibriSpeech need it
        raise ImportError("reading/writing FLAC needs the optional package 'soundfile': "
                          "pip install soundfile") from e
    return soundfile


def audio_info(path: str | Path) -> tuple[int, int]:
    """(num_frames, sample_rate) from the file header only, without decoding the samples."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        with open(path, "rb") as f:
            h = _parse_wav_header(path, f)
        return h.num_frames, h.sample_rate
    sf = _soundfile()
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError
        raise AudioError(f"{path}: cannot read audio header: {e}") from e
    return info.frames, info.samplerate


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a WAV or FLAC (or anything soundfile reads) file as a 1-D float32 tensor at `sr`.

    Stereo is mixed down to mono (mean of the channels). Raises AudioError naming the file for
    an empty, truncated or corrupt file, NaN/Inf samples, or a clip that is empty or longer than
    MAX_SECONDS.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    if path.suffix.lower() == ".wav":
        x, file_sr = read_wav(path)
    else:
        sf = _soundfile()
        try:
            x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"{path}: cannot decode audio: {e}") from e
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]   # (S,)
    check_waveform(x, file_sr, path)
    wav = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return resample(wav, file_sr, sr) if file_sr != sr else wav


def check_length(n: int, sr: int, path: str | Path) -> None:
    """Reject a clip of n samples at sr Hz that is empty or longer than MAX_SECONDS."""
    if n == 0:
        raise AudioError(f"{path}: zero-length clip (no samples)")
    if n > MAX_SECONDS * sr:
        raise AudioError(f"{path}: clip of {n / sr:.1f} s is longer than MAX_SECONDS = {MAX_SECONDS:g} s")


def check_waveform(x: np.ndarray | torch.Tensor, sr: int, path: str | Path) -> None:
    """Reject waveforms the models must never see: empty, too long, or non-finite."""
    check_length(len(x), sr, path)
    finite = np.isfinite(x) if isinstance(x, np.ndarray) else torch.isfinite(x).numpy()
    if not finite.all():
        raise AudioError(f"{path}: {int((~finite).sum())} NaN/Inf samples (first at sample "
                         f"{int(np.argmin(finite))})")


# ----------------------------------------------------------------------------------------------
# 2. Resampling
# ----------------------------------------------------------------------------------------------
#
# Changing the rate from `orig` to `new` Hz means evaluating the band-limited signal behind the
# samples at new instants. Ideal band-limited interpolation convolves with a sinc; we truncate
# the sinc to `RESAMPLE_ZEROS` zero crossings per side and taper it with a Kaiser window. The
# cutoff sits at RESAMPLE_ROLLOFF x the lower Nyquist, so that content above the *new* Nyquist
# (which would alias when downsampling) is removed.
#
# Polyphase trick: reduce the ratio by the gcd (22,050 -> 16,000 becomes 441 -> 320). Output
# sample m sits at input time m * orig / new. Writing m = b * new + j, every block b of `new`
# outputs starts at input sample b * orig, and output j of a block needs the filter shifted by
# the fractional offset j * orig / new, which is the same for every block. So there are only
# `new` distinct filters (phases), and one strided conv1d with `new` output channels computes
# all blocks at once: (N, 1, S) -> (N, new, blocks), interleaved to (N, blocks * new).

RESAMPLE_ZEROS = 24         # sinc zero crossings kept on each side of the centre
RESAMPLE_ROLLOFF = 0.945    # cutoff as a fraction of the lower Nyquist frequency
RESAMPLE_BETA = 8.0         # Kaiser window shape: ~80 dB sidelobes; transition ~0.12 x Nyquist
RESAMPLE_MIN_PHASES = 16    # compute at least this many output phases per conv step (speed only)


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase filter bank for the integer ratio orig -> new. Returns (kernel (new, 1, K), pad)."""
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF / 2 / orig    # cycles per input sample
    half = RESAMPLE_ZEROS / (2 * cutoff)                      # half-width in input samples
    pad = math.ceil(half)
    # Kernel tap k of phase j touches input sample (b * orig - pad + k); its distance from the
    # output instant (b * orig + j * orig / new) is t = k - pad - j * orig / new.
    k = torch.arange(2 * pad + orig, dtype=torch.float64)
    j = torch.arange(new, dtype=torch.float64)[:, None]
    t = k - pad - j * orig / new                              # (new, K)
    h = 2 * cutoff * torch.sinc(2 * cutoff * t)               # ideal low-pass, unit DC gain
    inside = (t.abs() <= half)
    w = torch.special.i0(RESAMPLE_BETA * torch.sqrt((1 - (t / half) ** 2).clamp(min=0)))
    w = w / torch.special.i0(torch.tensor(RESAMPLE_BETA, dtype=torch.float64))
    return (h * w * inside)[:, None, :], pad                  # (new, 1, K)


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling of (..., S) from orig_sr to new_sr along the last dim.

    The output has ceil(S * new_sr / orig_sr) samples. Float64 inputs stay float64; anything
    else is computed in float32.
    """
    if orig_sr == new_sr:
        return wav
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    # A ratio like 48k -> 16k reduces to 3 -> 1: a conv with a single output channel, which
    # runs ~10x slower than the same work spread over a few phases. Scaling both by r keeps the
    # filter and the result and computes r phases per conv step.
    r = math.ceil(RESAMPLE_MIN_PHASES / new)
    orig, new = orig * r, new * r
    kernel, pad = _sinc_kernel(orig, new)
    dtype = torch.float64 if wav.dtype == torch.float64 else torch.float32
    shape, S = wav.shape[:-1], wav.shape[-1]
    x = wav.reshape(-1, 1, S).to(dtype)                       # (N, 1, S)
    x = torch.nn.functional.pad(x, (pad, pad + orig))
    # On CPU, oneDNN (mkldnn) builds a kernel for every new input length, ~6 ms at 22,050 Hz; every file
    # has its own length, so PyTorch's native conv, ~1 ms, is faster here (measured for 8-48 kHz inputs).
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        y = torch.nn.functional.conv1d(x, kernel.to(dtype=dtype, device=wav.device), stride=orig)  # (N, new, blocks)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    y = y.transpose(1, 2).reshape(x.shape[0], -1)             # (N, blocks * new), interleaved
    out_len = math.ceil(S * new / orig)
    return y[:, :out_len].reshape(*shape, out_len)


# ----------------------------------------------------------------------------------------------
# 3. Synthetic speech (espeak-ng through ctypes)
# ----------------------------------------------------------------------------------------------
#
# espeak-ng is a formant synthesizer: small, fast (a few ms per command) and offline. The pip
# package `espeakng-loader` ships the shared library and its voice data, so no system install
# is needed; we call its C API through ctypes (see _espeak_worker). A voice is an English
# accent (a language file) plus a variant (formant, pitch and breathiness settings), with our
# rate/pitch/range parameters; after rendering we resample 22,050 -> 16,000 Hz, normalise the
# peak to the voice's gain and optionally add background noise.
#
# Determinism. espeak-ng keeps hidden state between utterances (e.g. a function-static pitch
# "flutter" phase, and libc rand() for noise sources), so the same text and voice rendered twice
# in one process gives slightly different samples (measured here: lengths differing by ~10
# samples, waveforms diverging after ~90 ms; re-initializing the library does not help). So
# every utterance is rendered in a fresh fork of a process that initialized espeak but never
# spoke, after srand(seed): each render starts from the same state, and the output is a pure
# function of (text, voice, seed).
#
# Speed. Forking *this* process is slow, because torch makes it big (measured: ~27 ms of CPU
# per utterance, most of it in the kernel). So the forking is done by small worker processes
# that run only `_espeak_worker` below, standard library and ctypes (~11 ms of CPU per
# utterance, render included). A worker is started as `python -c <source of _espeak_worker>`,
# so it never imports torch. Without fork (Windows) a worker renders in-process, and output
# may then differ slightly between runs.

ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# Variant voices (files in espeak-ng-data/voices/!v). f2, f3 and f5 are left out: their
# "breath" noise differs between processes even after srand (measured), which would break
# determinism; tests/test_data.py checks every variant listed here renders reproducibly.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "anika", "linda", "steph",
            "Alex", "david", "john", "klatt", "klatt2", "klatt3")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an espeak accent and variant plus prosody and channel settings."""
    accent: str = "en-us"               # espeak language voice (an English accent)
    variant: str = "m3"                 # espeak variant file in voices/!v (see VARIANTS)
    rate: int = 175                     # words per minute (espeak default 175)
    pitch: int = 50                     # base pitch, 0..100
    pitch_range: int = 50               # intonation range, 0..100
    gain: float = 0.9                   # peak-relative loudness after rendering
    noise_snr_db: float | None = None   # white background noise at this SNR; None = clean

    @property
    def speaker_id(self) -> str:
        """A readable, filesystem-safe id that determines the voice, e.g. 'en-us_m3_r175_p50_i50_g90_clean'."""
        noise = "clean" if self.noise_snr_db is None else f"n{self.noise_snr_db:g}"
        return (f"{self.accent}_{self.variant}_r{self.rate}_p{self.pitch}_i{self.pitch_range}"
                f"_g{round(self.gain * 100)}_{noise}")


def _espeak_worker(lib_path: str, data_path: str) -> None:
    """Main loop of a render worker: JSON jobs on stdin, one reply per job on stdout.

    Runs in its own interpreter (see "Speed" above), so it uses only the standard library.
    The espeak-ng C API, in synchronous mode:
      espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...) -> the output rate (22,050 Hz)
      espeak_SetSynthCallback(cb)                       -> cb receives blocks of int16 samples
      espeak_SetVoiceByName("en-us+m3"), espeak_SetParameter(RATE / PITCH / RANGE, value)
      espeak_Synth(text) then espeak_Synchronize()      -> returns when all samples are out
    Startup: the worker writes the output rate (int32). Reply to a job: a status byte (0 ok,
    1 error), a uint32 length, then the int16 samples or the error text.
    """
    import ctypes
    import json
    import os
    import struct
    import sys

    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, ESPEAK_CHARS_UTF8 = 2, 1, 1   # espeak-ng enums
    PARAMS = {"rate": 1, "pitch": 3, "range": 4}                              # espeak_PARAMETER
    lib = ctypes.CDLL(lib_path)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    chunks: list[bytes] = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_samples(wav, n, events):
        if n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0                                   # 0 = keep going

    lib.espeak_SetSynthCallback(on_samples)
    libc = ctypes.CDLL(None)                       # espeak's noise sources use libc rand()

    def render(job: dict) -> bytes:
        chunks.clear()
        libc.srand(job["seed"])
        if lib.espeak_SetVoiceByName(job["voice"].encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {job['voice']!r}")
        for name, param in PARAMS.items():
            lib.espeak_SetParameter(param, job[name], 0)
        text = job["text"].encode("utf-8") + b"\0"
        if lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak-ng failed to synthesize {job['text']!r}")
        lib.espeak_Synchronize()
        return b"".join(chunks)

    def reply_to(job: dict) -> bytes:
        try:
            return b"\0" + render(job)
        except Exception as e:
            return b"\1" + str(e).encode()

    out = sys.stdout.buffer
    out.write(struct.pack("<i", rate))
    out.flush()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        if hasattr(os, "fork"):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                           # child: render once from the pristine state
                os.close(r)
                with os.fdopen(w, "wb") as f:
                    f.write(reply_to(job))
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                reply = f.read()
            os.waitpid(pid, 0)
            reply = reply or b"\1" + b"render process died"
        else:
            reply = reply_to(job)
        out.write(reply[:1] + struct.pack("<I", len(reply) - 1) + reply[1:])
        out.flush()


@lru_cache(maxsize=1)
def _espeak_files() -> tuple[str, str, frozenset[str], frozenset[str]]:
    """(library path, data path, known accents, known variants) from espeakng-loader."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise ImportError("synthetic speech needs espeak-ng from the pip package "
                          "'espeakng-loader': pip install espeakng-loader") from e
    data_path = Path(espeakng_loader.get_data_path())
    accents = frozenset(p.name.lower() for p in (data_path / "lang").rglob("*") if p.is_file())
    variants = frozenset(os.listdir(data_path / "voices" / "!v"))
    return espeakng_loader.get_library_path(), str(data_path), accents, variants


class _EspeakWorkers:
    """A pool of `n` render workers (see _espeak_worker); render(jobs) yields int16 arrays in order."""

    def __init__(self, n: int) -> None:
        lib_path, data_path, _, _ = _espeak_files()
        source = inspect.getsource(_espeak_worker) + f"\n_espeak_worker({lib_path!r}, {data_path!r})\n"
        self.procs = [subprocess.Popen([sys.executable, "-I", "-c", source], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE) for _ in range(n)]
        for p in self.procs:
            header = p.stdout.read(4)
            rate = struct.unpack("<i", header)[0] if len(header) == 4 else -1
            if rate != ESPEAK_RATE:
                self.close()
                raise RuntimeError(f"espeak-ng worker failed to start (reported rate {rate}, expected "
                                   f"{ESPEAK_RATE}); library {lib_path}, data {data_path}")

    def _send(self, i: int, job: tuple[str, Voice, int]) -> None:
        text, voice, seed = job
        msg = {"text": text, "voice": f"{voice.accent}+{voice.variant}", "rate": voice.rate,
               "pitch": voice.pitch, "range": voice.pitch_range, "seed": seed & 0x7FFFFFFF}
        stdin = self.procs[i % len(self.procs)].stdin
        stdin.write(json.dumps(msg).encode() + b"\n")
        stdin.flush()

    def render(self, jobs: Sequence[tuple[str, Voice, int]]) -> Iterator[np.ndarray]:
        # Job i goes to worker i % n. Keep two jobs per worker in flight, and read the replies in
        # job order: worker (i % n) answers its jobs in the order it got them.
        ahead = 2 * len(self.procs)
        for i in range(min(ahead, len(jobs))):
            self._send(i, jobs[i])
        for i, job in enumerate(jobs):
            stdout = self.procs[i % len(self.procs)].stdout
            head = stdout.read(5)
            if len(head) < 5:
                raise RuntimeError(f"espeak-ng worker died while rendering {job[0]!r}")
            status, size = head[0], struct.unpack("<I", head[1:])[0]
            payload = stdout.read(size)
            if status != 0:
                raise RuntimeError(f"espeak-ng could not render {job[0]!r} with {job[1]}: "
                                   f"{payload.decode(errors='replace')}")
            if i + ahead < len(jobs):
                self._send(i + ahead, jobs[i + ahead])
            yield np.frombuffer(payload, dtype=np.int16)

    def close(self, kill: bool = False) -> None:
        for p in self.procs:
            if kill:              # after an error: replies may be pending, do not wait for them
                p.kill()
            p.stdin.close()       # end of input: the worker's loop ends and it exits
        for p in self.procs:
            p.stdout.close()
            p.wait(timeout=30)

    def __enter__(self) -> "_EspeakWorkers":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)


def _finish(samples: np.ndarray, voice: Voice, seed: int) -> torch.Tensor:
    """int16 @ 22,050 Hz -> float32 @ 16 kHz, peak-normalised to `gain`, optional noise."""
    x = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    x = resample(x, ESPEAK_RATE, SAMPLE_RATE)
    peak = x.abs().max().clamp(min=1e-4)
    x = x * (voice.gain / peak)
    if voice.noise_snr_db is not None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=g)
        # SNR in dB = 10 log10(P_signal / P_noise): scale unit-power noise to the target power.
        x = x + noise * x.pow(2).mean().sqrt() * 10 ** (-voice.noise_snr_db / 20)
        x = x.clamp(-1, 1)
    return x


def _cache_key(text: str, voice: Voice, seed: int) -> str:
    blob = json.dumps([text, asdict(voice), seed, SAMPLE_RATE, RESAMPLE_ZEROS, RESAMPLE_BETA], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """$SEAL_CACHE (default ~/.cache/seal), shared with the models' cache."""
    return Path(os.environ.get("SEAL_CACHE", Path.home() / ".cache" / "seal"))


def synthesize_many(jobs: Sequence[tuple[str, Voice, int]], cache_dir: str | Path | None = None,
                    parallel: int | None = None, progress: bool = False) -> list[torch.Tensor]:
    """Render [(text, voice, seed), ...] to 16 kHz float32 waveforms, deterministically.

    With `cache_dir`, each result is stored as <cache_dir>/<hash>.npy, keyed by (text, voice,
    seed); later calls read it back instead of rendering.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    out: list[torch.Tensor | None] = [None] * len(jobs)
    todo = []
    for i, (text, voice, seed) in enumerate(jobs):
        if not text.strip():
            raise ValueError(f"job {i}: empty text")
        f = cache / f"{_cache_key(text, voice, seed)}.npy" if cache else None
        if f is not None and f.is_file():
            out[i] = torch.from_numpy(np.load(f))
        else:
            todo.append(i)
    if todo:
        _, _, accents, variants = _espeak_files()
        for accent, variant in {(jobs[i][1].accent, jobs[i][1].variant) for i in todo}:
            if variant not in variants:
                raise ValueError(f"unknown espeak variant {variant!r} (e.g. {', '.join(VARIANTS)})")
            if accent.lower() not in accents:
                raise ValueError(f"unknown espeak accent {accent!r} (e.g. {', '.join(ACCENTS)})")
        # The workers take every core. This process only resamples one clip at a time, and torch's intra-op
        # threads would compete with the workers for the cores: with one thread, write_fsc of 1,000 clips takes
        # 6.4 s instead of 8.4 s on 2 cores (measured). The resampler's sums may then round differently: of the
        # micro world's 4,500 clips, 15 changed, in 1 to 4 samples each, by one int16 step.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _EspeakWorkers(min(parallel or os.cpu_count() or 1, len(todo))) as workers:
                rendered = workers.render([jobs[i] for i in todo])
                for i, samples in tqdm(zip(todo, rendered), total=len(todo), desc="synthesizing speech",
                                       unit="utt", disable=not progress):
                    text, voice, seed = jobs[i]
                    if samples.size == 0:
                        raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {voice}")
                    out[i] = x = _finish(samples, voice, seed)
                    if cache is not None:
                        cache.mkdir(parents=True, exist_ok=True)
                        tmp = cache / f"{_cache_key(text, voice, seed)}.{os.getpid()}.tmp.npy"
                        np.save(tmp, x.numpy())
                        os.replace(tmp, cache / f"{_cache_key(text, voice, seed)}.npy")  # atomic
        finally:
            torch.set_num_threads(threads)
    return out  # type: ignore[return-value]


def synthesize(text: str, voice: Voice = Voice(), seed: int = 0,
               cache_dir: str | Path | None = None) -> torch.Tensor:
    """Render one text to a 1-D float32 waveform at 16 kHz."""
    return synthesize_many([(text, voice, seed)], cache_dir=cache_dir, parallel=1)[0]


def make_voices(n: int, seed: int = 0, noise: bool = True,
                exclude: set[tuple[str, str]] = frozenset()) -> list[Voice]:
    """n distinct voices with different (accent, variant) pairs, random prosody, some noisy."""
    rng = random.Random(seed)
    bases = [(a, v) for a in ACCENTS for v in VARIANTS if (a, v) not in exclude]
    if n > len(bases):
        raise ValueError(f"asked for {n} voices, only {len(bases)} (accent, variant) pairs available")
    rng.shuffle(bases)
    return [Voice(accent=a, variant=v, rate=rng.randint(140, 210), pitch=rng.randint(30, 70),
                  pitch_range=rng.randint(30, 80), gain=round(rng.uniform(0.5, 0.95), 2),
                  noise_snr_db=rng.choice([None, 30.0, 20.0]) if noise else None)
            for a, v in bases[:n]]


def split_voices(n_train: int, n_valid: int, n_test: int, seed: int = 0) -> dict[str, list[Voice]]:
    """Voices for train/valid/test with disjoint (accent, variant) pairs: unseen speakers at test."""
    voices = make_voices(n_train + n_valid + n_test, seed)
    return {"train": voices[:n_train], "valid": voices[n_train:n_train + n_valid],
            "test": voices[n_train + n_valid:]}


# ----------------------------------------------------------------------------------------------
# 4. Command grammars
# ----------------------------------------------------------------------------------------------
#
# A grammar is a list of intents, each with a label and many phrasings (templates). Templates
# may name slots in braces, "{time}"; sampling fills each slot with a random filler of that
# type. The phrasings are our own; only the label inventories follow the real datasets.


@dataclass
class Intent:
    label: str                     # FSC: "activate lights kitchen"; SLURP: "alarm_set"
    fields: dict[str, str]         # FSC: action/object/location; SLURP: scenario/action
    templates: list[str]           # phrasings, possibly with {slot} placeholders


@dataclass
class Grammar:
    name: str
    intents: list[Intent]
    slots: dict[str, list[str]] = field(default_factory=dict)   # slot type -> fillers

    @property
    def labels(self) -> list[str]:
        return [it.label for it in self.intents]


@dataclass
class Command:
    """One sampled command: the spoken text plus everything a dataset row records about it."""
    text: str                       # "wake me up at seven am"
    label: str                      # "alarm_set"
    fields: dict[str, str]          # the intent's fields
    annotation: str                 # text with slots marked, SLURP style: "wake me up at [time : seven am]"
    entities: list[tuple[str, str]] # (slot type, filler) in order of appearance


_SLOT = re.compile(r"\{(\w+)\}")


def sample_command(grammar: Grammar, rng: random.Random) -> Command:
    """Pick an intent uniformly, then a phrasing uniformly, then fill its slots."""
    intent = rng.choice(grammar.intents)
    template = rng.choice(intent.templates)
    entities: list[tuple[str, str]] = []

    def fill(m: re.Match) -> str:
        slot = m.group(1)
        if slot not in grammar.slots:
            raise KeyError(f"grammar {grammar.name}: template {template!r} uses unknown slot {slot!r}")
        entities.append((slot, rng.choice(grammar.slots[slot])))
        return "\0"   # placeholder, replaced below in both renderings

    skeleton = _SLOT.sub(fill, template)
    text, annotation = skeleton, skeleton
    for slot, value in entities:
        text = text.replace("\0", value, 1)
        annotation = annotation.replace("\0", f"[{slot} : {value}]", 1)
    return Command(text, intent.label, dict(intent.fields), annotation, entities)


def iter_commands(grammar: Grammar, seed: int = 0, n: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (text, label) pairs from a grammar, reproducibly; forever when n is None.

    The micro world draws its LM text corpus and its speech corpus from the same grammar
    through this function, so the two share phrasings and labels.
    """
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        c = sample_command(grammar, rng)
        yield c.text, c.label
        i += 1


# -- FSC-style grammar: the 31 real intents --------------------------------------------------
# Phrasings per (action, object). "{in_loc}" becomes " in the kitchen" and "{loc_}" becomes
# "kitchen " for intents with a location, and "" for location "none".

_FSC_PHRASES: dict[tuple[str, str], list[str]] = {
    ("activate", "lights"): [
        "turn on the {loc_}lights", "switch on the lights{in_loc}", "turn the {loc_}lights on",
        "lights on{in_loc}", "put the {loc_}lights on", "i need some light{in_loc}",
        "can you turn the lights on{in_loc}", "please switch the {loc_}lights on",
        "it is too dark{in_loc}", "light up the {loc_}room"],
    ("deactivate", "lights"): [
        "turn off the {loc_}lights", "switch off the lights{in_loc}", "turn the {loc_}lights off",
        "lights off{in_loc}", "kill the {loc_}lights", "no more light{in_loc} please",
        "can you turn the lights off{in_loc}", "please switch the {loc_}lights off",
        "it is too bright{in_loc}", "shut off the lights{in_loc}"],
    ("increase", "heat"): [
        "turn up the heat{in_loc}", "make it warmer{in_loc}", "raise the {loc_}temperature",
        "increase the heating{in_loc}", "it is too cold{in_loc}", "heat up the {loc_}room",
        "can you turn the {loc_}heating up", "i am freezing{in_loc}", "more heat{in_loc} please",
        "bump up the temperature{in_loc}"],
    ("decrease", "heat"): [
        "turn down the heat{in_loc}", "make it cooler{in_loc}", "lower the {loc_}temperature",
        "decrease the heating{in_loc}", "it is too hot{in_loc}", "cool down the {loc_}room",
        "can you turn the {loc_}heating down", "i am boiling{in_loc}", "less heat{in_loc} please",
        "reduce the temperature{in_loc}"],
    ("activate", "lamp"): [
        "turn on the lamp", "switch the lamp on", "lamp on", "put the lamp on please",
        "could you turn my lamp on", "i want the lamp on", "light the lamp"],
    ("deactivate", "lamp"): [
        "turn off the lamp", "switch the lamp off", "lamp off", "put the lamp out please",
        "could you turn my lamp off", "i want the lamp off", "shut the lamp off"],
    ("activate", "music"): [
        "play some music", "turn on the music", "start the music", "music on please",
        "put some music on", "i want to hear music", "play a song", "switch the music on"],
    ("deactivate", "music"): [
        "stop the music", "turn off the music", "pause the music", "music off please",
        "switch the music off", "no more music", "stop playing songs", "kill the music"],
    ("increase", "volume"): [
        "turn up the volume", "make it louder", "louder please", "increase the volume",
        "i can not hear it", "volume up", "raise the sound", "turn the sound up", "pump it up"],
    ("decrease", "volume"): [
        "turn down the volume", "make it quieter", "quieter please", "decrease the volume",
        "it is too loud", "volume down", "lower the sound", "turn the sound down", "keep it down"],
    ("bring", "newspaper"): [
        "bring me the newspaper", "get me the paper", "fetch the newspaper",
        "i want to read the newspaper", "can you bring the newspaper", "grab me today's paper",
        "go get the newspaper"],
    ("bring", "juice"): [
        "bring me some juice", "get me a juice", "fetch me a glass of juice", "i am thirsty, juice please",
        "can you bring the juice", "grab me some juice", "i would like some juice"],
    ("bring", "socks"): [
        "bring me my socks", "get me some socks", "fetch my socks", "my feet are cold, socks please",
        "can you bring the socks", "grab me a pair of socks", "i need my socks"],
    ("bring", "shoes"): [
        "bring me my shoes", "get me my shoes", "fetch the shoes", "i need my shoes",
        "can you bring my shoes", "grab me a pair of shoes", "where are my shoes, bring them"],
    ("change language", "none"): [
        "change the language", "switch the language", "use a different language",
        "i want another language", "change language settings", "set a new language",
        "can you change the language"],
}
for _lang in ("Chinese", "Korean", "English", "German"):
    _FSC_PHRASES[("change language", _lang)] = [
        p.replace("LANG", _lang) for p in (
            "switch to LANG", "change the language to LANG", "set the language to LANG",
            "speak LANG", "use LANG please", "i want LANG", "can you talk in LANG",
            "language LANG", "make it LANG")]

FSC_LOCATIONS = {"kitchen": ["kitchen"], "bedroom": ["bedroom"], "washroom": ["washroom", "bathroom"]}
_FSC_LOCATED = {("activate", "lights"), ("deactivate", "lights"), ("increase", "heat"), ("decrease", "heat")}


def fsc_grammar() -> Grammar:
    """The 31 FSC intents, (action, object, location), with our own phrasings (7-20 each)."""
    intents = []
    for (action, obj), phrases in _FSC_PHRASES.items():
        locations = ["none", *FSC_LOCATIONS] if (action, obj) in _FSC_LOCATED else ["none"]
        for loc in locations:
            words = FSC_LOCATIONS.get(loc, [""])
            templates = sorted({p.replace("{in_loc}", f" in the {w}" if w else "").replace("{loc_}", f"{w} " if w else "")
                                for p in phrases for w in words})
            label = f"{action} {obj} {loc}"
            intents.append(Intent(label, {"action": action, "object": obj, "location": loc}, templates))
    return Grammar("fsc", intents)



# -- SLURP-style grammar: scenario_action intents over the 18 real scenarios -----------------

SLURP_SLOTS: dict[str, list[str]] = {
    "time": ["seven am", "six thirty", "noon", "ten pm", "eight fifteen", "midnight", "nine o'clock"],
    "date": ["tomorrow", "today", "monday", "next friday", "the weekend", "march third", "tonight"],
    "timeofday": ["morning", "evening", "afternoon", "night"],
    "place_name": ["london", "paris", "tokyo", "new york", "berlin", "the office", "madrid"],
    "person": ["john", "sarah", "my mother", "alex", "the boss", "emma", "david"],
    "relation": ["mom", "dad", "sister", "brother", "wife", "friend"],
    "event_name": ["dentist appointment", "team meeting", "yoga class", "birthday party", "lunch with anna"],
    "weather_descriptor": ["rain", "snow", "sunny", "windy", "cold"],
    "song_name": ["yellow submarine", "bohemian rhapsody", "let it be", "hey jude"],
    "artist_name": ["the beatles", "queen", "adele", "miles davis", "taylor swift"],
    "music_genre": ["jazz", "rock", "classical music", "pop", "hip hop"],
    "radio_name": ["bbc radio one", "jazz fm", "classic radio", "kiss fm"],
    "podcast_name": ["the daily", "science weekly", "history hour"],
    "audiobook_name": ["harry potter", "the hobbit", "pride and prejudice"],
    "game_name": ["chess", "trivia", "hangman", "twenty questions"],
    "house_place": ["kitchen", "living room", "bedroom", "hallway", "office"],
    "color_type": ["blue", "red", "warm white", "green", "purple"],
    "device_type": ["vacuum", "robot cleaner", "coffee machine", "smart plug", "fan"],
    "food_type": ["pasta", "pizza", "pancakes", "curry", "chicken soup", "sushi"],
    "business_name": ["pizza palace", "the golden dragon", "burger barn", "sushi place"],
    "list_name": ["shopping", "groceries", "to do", "packing"],
    "item": ["milk", "eggs", "bread", "batteries", "coffee"],
    "currency_name": ["dollars", "euros", "pounds", "yen"],
    "number": ["ten", "fifty", "a hundred", "twenty five"],
    "definition_word": ["serendipity", "ephemeral", "ubiquitous", "quantum"],
    "news_topic": ["sports", "politics", "technology", "the economy", "science"],
    "media_type": ["twitter", "facebook", "instagram"],
    "transport_type": ["train", "bus", "taxi", "flight"],
    "company": ["apple", "google", "tesla", "amazon"],
    "movie_type": ["comedy", "horror movie", "action film", "documentary"],
    "email_address": ["john at work dot com", "my work address"],
}

_SLURP_PHRASES: dict[tuple[str, str], list[str]] = {
    ("alarm", "set"): ["wake me up at {time}", "set an alarm for {time}", "alarm at {time} {date}",
                       "i need to get up at {time}", "please set my alarm for {time} {date}"],
    ("alarm", "query"): ["what alarms do i have", "when is my alarm set for", "is there an alarm {date}",
                         "list my alarms", "show the alarms for {date}"],
    ("alarm", "remove"): ["cancel my {time} alarm", "delete the alarm for {date}", "turn off all alarms",
                          "remove the {time} alarm", "i don't need the alarm {date}"],
    ("audio", "volume_up"): ["turn it up", "louder please", "increase the volume", "raise the sound a bit"],
    ("audio", "volume_down"): ["turn it down", "quieter please", "lower the volume", "reduce the sound"],
    ("audio", "volume_mute"): ["mute", "be quiet", "silence please", "mute the speaker", "stop talking for now"],
    ("calendar", "set"): ["add {event_name} to my calendar {date}", "schedule {event_name} at {time}",
                          "put {event_name} on {date}", "book a {event_name} for {date} at {time}",
                          "remind me about {event_name} {date}"],
    ("calendar", "query"): ["what is on my calendar {date}", "do i have anything {date}",
                            "when is my {event_name}", "what meetings do i have {date}",
                            "am i free at {time} {date}"],
    ("calendar", "remove"): ["cancel my {event_name}", "delete {event_name} from the calendar",
                             "clear my schedule {date}", "remove the {event_name} on {date}"],
    ("cooking", "recipe"): ["how do i make {food_type}", "give me a recipe for {food_type}",
                            "what do i need to cook {food_type}", "find a {food_type} recipe",
                            "teach me to make {food_type}"],
    ("cooking", "query"): ["how long do i boil {food_type}", "what temperature for {food_type}",
                           "is {food_type} hard to cook", "how many calories in {food_type}"],
    ("datetime", "query"): ["what time is it", "what is the date {date}", "what time is it in {place_name}",
                            "what day is it {date}", "tell me the time"],
    ("datetime", "convert"): ["what is {time} in {place_name} time", "convert {time} to {place_name} time",
                              "if it is {time} here what time is it in {place_name}"],
    ("email", "sendemail"): ["send an email to {person}", "email {person} about the {event_name}",
                             "write to {person} that i am late", "reply to {person}'s email"],
    ("email", "query"): ["do i have new emails", "read my emails", "any mail from {person}",
                         "check my inbox", "what did {person} email me {date}"],
    ("email", "addcontact"): ["add {email_address} to my contacts", "save {person}'s email as {email_address}",
                              "new contact {person} at {email_address}"],
    ("general", "joke"): ["tell me a joke", "make me laugh", "do you know any jokes", "say something funny"],
    ("general", "greet"): ["hello there", "good {timeofday}", "hi how are you", "hey what's up"],
    ("general", "quirky"): ["do you dream", "what is the meaning of life", "are you a robot",
                            "sing me something", "do you like me"],
    ("iot", "hue_lightoff"): ["turn off the lights in the {house_place}", "lights off",
                              "switch off the {house_place} light", "make it dark in the {house_place}"],
    ("iot", "hue_lightchange"): ["make the lights {color_type}", "change the {house_place} light to {color_type}",
                                 "set the lights to {color_type}", "i want {color_type} light"],
    ("iot", "cleaning"): ["start the {device_type}", "clean the {house_place}", "vacuum the floor",
                          "turn on the {device_type} in the {house_place}"],
    ("iot", "coffee"): ["make me a coffee", "start the coffee machine", "i need coffee",
                        "brew a cup of coffee", "coffee please"],
    ("lists", "createoradd"): ["add {item} to my {list_name} list", "create a {list_name} list",
                               "put {item} on the {list_name} list", "new list called {list_name}"],
    ("lists", "query"): ["what is on my {list_name} list", "read my {list_name} list",
                         "do i have {item} on my list", "show me my lists"],
    ("lists", "remove"): ["remove {item} from the {list_name} list", "delete my {list_name} list",
                          "take {item} off my list", "clear the {list_name} list"],
    ("music", "query"): ["what song is this", "who sings this", "what is playing",
                         "which album is this from", "who is the artist"],
    ("music", "likeness"): ["i like this song", "i love {artist_name}", "remember that i like {music_genre}",
                            "this is a great track", "save this song to my favourites"],
    ("music", "settings"): ["shuffle my songs", "repeat this song", "turn on shuffle", "play it on repeat"],
    ("news", "query"): ["what is the news {date}", "tell me the latest {news_topic} news",
                        "any news about {news_topic}", "read me the headlines", "what happened in {place_name}"],
    ("play", "music"): ["play {song_name}", "play some {music_genre}", "put on {artist_name}",
                        "i want to hear {song_name} by {artist_name}", "play music by {artist_name}"],
    ("play", "radio"): ["play {radio_name}", "turn on the radio", "put on {radio_name} please",
                        "tune in to {radio_name}"],
    ("play", "podcasts"): ["play the next episode of {podcast_name}", "play {podcast_name}",
                           "resume my podcast", "any new episodes of {podcast_name}"],
    ("play", "audiobook"): ["continue {audiobook_name}", "read {audiobook_name} to me",
                            "resume my audiobook", "play the audiobook {audiobook_name}"],
    ("qa", "factoid"): ["how tall is the eiffel tower", "who is the president of france",
                        "how far is {place_name} from {place_name}", "what is the population of {place_name}",
                        "when was {person} born"],
    ("qa", "definition"): ["what does {definition_word} mean", "define {definition_word}",
                           "give me the meaning of {definition_word}", "what is the definition of {definition_word}"],
    ("qa", "currency"): ["how many {currency_name} is {number} {currency_name}",
                         "what is the exchange rate for {currency_name}",
                         "convert {number} {currency_name} to {currency_name}"],
    ("qa", "stock"): ["how is {company} stock doing", "what is the share price of {company}",
                      "did {company} go up {date}", "stock price for {company}"],
    ("recommendation", "events"): ["what is happening in {place_name} {date}", "any concerts {date}",
                                   "find me something fun to do {date}", "suggest an event near me"],
    ("recommendation", "locations"): ["where can i get good {food_type}", "recommend a restaurant in {place_name}",
                                      "what is a nice place to visit in {place_name}", "best cafe near me"],
    ("recommendation", "movies"): ["recommend a {movie_type}", "what movie should i watch",
                                   "suggest a good {movie_type} for {date}", "any new films worth seeing"],
    ("social", "post"): ["post on {media_type} that i am on holiday", "tweet this song",
                         "share my location on {media_type}", "complain to {business_name} on {media_type}"],
    ("social", "query"): ["what is new on {media_type}", "any updates from {person}",
                          "check my {media_type} notifications", "did {person} post anything {date}"],
    ("takeaway", "order"): ["order {food_type} from {business_name}", "i want {food_type} delivered",
                            "get me a takeaway from {business_name}", "order dinner for {time}"],
    ("takeaway", "query"): ["is my order from {business_name} on the way", "does {business_name} deliver",
                            "how long until my food arrives", "what is the status of my takeaway"],
    ("transport", "query"): ["when is the next {transport_type} to {place_name}",
                             "how do i get to {place_name}", "is the {transport_type} on time"],
    ("transport", "ticket"): ["book a {transport_type} ticket to {place_name}", "buy me a ticket to {place_name} {date}",
                              "i need a {transport_type} ticket for {date}"],
    ("transport", "taxi"): ["call me a taxi", "book a taxi to {place_name} at {time}", "i need a cab",
                            "get me a ride to {place_name}"],
    ("transport", "traffic"): ["how is the traffic to {place_name}", "is there traffic on the way to work",
                               "any road works {date}", "how busy are the roads"],
    ("weather", "query"): ["what is the weather {date}", "will it {weather_descriptor} {date}",
                           "do i need an umbrella {date}", "how hot will it be in {place_name}",
                           "is it {weather_descriptor} in {place_name}"],
}

SLURP_SCENARIOS = ("alarm", "audio", "calendar", "cooking", "datetime", "email", "general", "iot", "lists",
                   "music", "news", "play", "qa", "recommendation", "social", "takeaway", "transport", "weather")


def slurp_grammar() -> Grammar:
    """scenario_action intents across the 18 SLURP scenarios, our own phrasings, slot fillers."""
    intents = [Intent(f"{scenario}_{action}", {"scenario": scenario, "action": action}, phrases)
               for (scenario, action), phrases in _SLURP_PHRASES.items()]
    return Grammar("slurp", intents, SLURP_SLOTS)


GRAMMARS = {"fsc": fsc_grammar, "slurp": slurp_grammar}


# ----------------------------------------------------------------------------------------------
# 5. Writing synthetic sets in the real layouts
# ----------------------------------------------------------------------------------------------

FSC_DIR = "fluent_speech_commands_dataset"
FSC_SPLITS = ("train", "valid", "test")
FSC_COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")
SLURP_SPLITS = ("train", "devel", "test")
SLURP_FIELDS = ("slurp_id", "sentence", "sentence_annotation", "intent", "action", "scenario",
                "tokens", "entities", "recordings")


def _plan(grammar: Grammar, counts: dict[str, int], voices: dict[str, list[Voice]], seed: int,
          per_item: int = 1) -> dict[str, list[tuple[Command, list[Voice], str]]]:
    """For each split: n (command, voices that say it, uuid) triples, reproducible from seed."""
    plan = {}
    for split, n in counts.items():
        rng = random.Random(f"{seed}/{grammar.name}/{split}")
        pool = voices[split]
        if len(pool) < per_item:
            raise ValueError(f"split {split}: {len(pool)} voices, need >= {per_item} per item")
        plan[split] = [(sample_command(grammar, rng), rng.sample(pool, per_item),
                        str(uuid.UUID(int=rng.getrandbits(128), version=4))) for _ in range(n)]
    return plan


def write_fsc(out: str | Path, counts: dict[str, int], voices: dict[str, list[Voice]], seed: int = 0,
              cache_dir: str | Path | None = None, progress: bool = False,
              parallel: int | None = None) -> Path:
    """Write a synthetic FSC set: <out>/fluent_speech_commands_dataset/{data/*.csv, wavs/speakers/..}."""
    root = Path(out) / FSC_DIR
    plan = _plan(fsc_grammar(), counts, voices, seed)
    jobs = [(c.text, vs[0], _seed_of(u)) for split in plan for c, vs, u in plan[split]]
    wavs = iter(synthesize_many(jobs, cache_dir=cache_dir, parallel=parallel, progress=progress))
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in plan.items():
        with open(root / "data" / f"{split}_data.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", *FSC_COLUMNS])   # the real header starts with an unnamed index column
            for i, (c, (voice,), u) in enumerate(rows):
                rel = f"wavs/speakers/{voice.speaker_id}/{u}.wav"
                write_wav(root / rel, next(wavs))
                text = c.text[0].upper() + c.text[1:]
                w.writerow([i, rel, voice.speaker_id, text, c.fields["action"], c.fields["object"],
                            c.fields["location"]])
    return root


def write_slurp(out: str | Path, counts: dict[str, int], voices: dict[str, list[Voice]], seed: int = 0,
                recordings: int = 2, audio_format: str = "flac", cache_dir: str | Path | None = None,
                progress: bool = False, parallel: int | None = None) -> Path:
    """Write a synthetic SLURP set: <out>/slurp/{dataset/slurp/*.jsonl, audio/slurp_real/*.flac}.

    Each sentence is spoken by `recordings` different voices; the first recording is named like
    the real headset recordings (audio-<id>-headset.flac), the others like the far-field ones.
    """
    if audio_format == "flac":
        _soundfile()   # fail now, with the install hint, not after rendering
    elif audio_format != "wav":
        raise ValueError(f"audio_format must be 'flac' or 'wav', got {audio_format!r}")
    root = Path(out) / "slurp"
    plan = _plan(slurp_grammar(), counts, voices, seed, per_item=recordings)
    jobs = [(c.text, v, _seed_of(u) + k) for split in plan for c, vs, u in plan[split]
            for k, v in enumerate(vs)]
    wavs = iter(synthesize_many(jobs, cache_dir=cache_dir, parallel=parallel, progress=progress))
    (root / "dataset" / "slurp").mkdir(parents=True, exist_ok=True)
    audio_dir = root / "audio" / "slurp_real"
    audio_dir.mkdir(parents=True, exist_ok=True)
    slurp_id = 0
    for split, rows in plan.items():
        with open(root / "dataset" / "slurp" / f"{split}.jsonl", "w") as f:
            for c, vs, u in rows:
                slurp_id += 1
                stem = f"audio-{_seed_of(u)}"
                recs = []
                for k in range(len(vs)):
                    name = f"{stem}-headset.{audio_format}" if k == 0 else f"{stem}-{k}.{audio_format}"
                    wav = next(wavs)
                    if audio_format == "flac":
                        _soundfile().write(str(audio_dir / name), wav.numpy(), SAMPLE_RATE, subtype="PCM_16")
                    else:
                        write_wav(audio_dir / name, wav)
                    recs.append({"file": name, "wer": 0.0, "ent_wer": 0.0, "status": "correct"})
                words = c.text.split()
                f.write(json.dumps({
                    "slurp_id": slurp_id, "sentence": c.text, "sentence_annotation": c.annotation,
                    "intent": c.label, "action": c.fields["action"], "scenario": c.fields["scenario"],
                    "tokens": [{"surface": w, "id": i, "lemma": w, "pos": ""} for i, w in enumerate(words)],
                    "entities": _entity_spans(words, c.entities), "recordings": recs}) + "\n")
    return root


def _seed_of(u: str) -> int:
    """A 31-bit integer from a uuid string: the render seed and the SLURP audio id."""
    return int(u.replace("-", "")[:8], 16) & 0x7FFFFFFF


def _entity_spans(words: list[str], entities: list[tuple[str, str]]) -> list[dict]:
    """SLURP entities: {"type", "span": [token ids]}, found left to right in the token list."""
    out, start = [], 0
    for slot, value in entities:
        v = value.split()
        for i in range(start, len(words) - len(v) + 1):
            if words[i:i + len(v)] == v:
                out.append({"type": slot, "span": list(range(i, i + len(v)))})
                start = i + len(v)
                break
    return out


# ----------------------------------------------------------------------------------------------
# 6. Datasets
# ----------------------------------------------------------------------------------------------
#
# Every dataset is a list of rows {path, text, label, speaker} read from the dataset's own index
# files; __getitem__ decodes the audio. Bad input is either an error that names the file (and
# row), or, with skip_bad=True, a skip that is counted in `.skipped` and logged with a warning:
#   - rows with missing fields are checked when the index is read;
#   - with skip_bad, every audio file's header is checked up front (missing, empty, truncated,
#     unsupported width, zero-length, longer than MAX_SECONDS), cheaply, without decoding;
#   - problems only visible in the samples (NaN/Inf, a corrupt FLAC stream) surface in
#     __getitem__: it then returns None, and `collate` leaves such items out of the batch.
#     (With DataLoader workers, those skips are logged and counted inside the workers.)


class AudioDataset(torch.utils.data.Dataset):
    """Rows of {path, text, label, speaker}; items add the decoded 16 kHz waveform as `wav`."""

    def __init__(self, rows: list[dict], skip_bad: bool = False, cache_dir: str | Path | None = None,
                 bad_rows: Sequence[str] = ()) -> None:
        self.skip_bad = skip_bad
        self.skipped = 0
        for why in bad_rows:     # index rows already rejected by the subclass (only with skip_bad)
            self._skip(why)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._lengths: list[int] | None = None
        self.rows = rows
        if skip_bad:   # check every header now, so that lengths() and the sampler see only good files
            good, lengths = [], []
            for row in rows:
                try:
                    lengths.append(self._header_length(row["path"]))
                    good.append(row)
                except (AudioError, OSError, ImportError) as e:
                    self._skip(str(e))
            self.rows, self._lengths = good, lengths

    def _skip(self, why: str) -> None:
        self.skipped += 1
        log.warning("skipping (%d so far): %s", self.skipped, why)

    @staticmethod
    def _header_length(path: Path) -> int:
        """Length in samples at 16 kHz, from the header; raises AudioError for an unusable file."""
        if not path.is_file():
            raise AudioError(f"{path}: no such audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: empty file")
        frames, sr = audio_info(path)
        check_length(frames, sr, path)
        return math.ceil(frames * SAMPLE_RATE / sr)

    def lengths(self) -> list[int]:
        """Every item's length in 16 kHz samples (from file headers), for length bucketing."""
        if self._lengths is None:
            self._lengths = [self._header_length(r["path"]) for r in self.rows]
        return self._lengths

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, path: Path) -> torch.Tensor:
        """Decode (or read back from the decoded-audio cache) one file as 16 kHz float32."""
        if self.cache_dir is None:
            return load_audio(path)
        st = path.stat()   # key on path + mtime + size: an edited file gets a new entry
        key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()
        f = self.cache_dir / key[:2] / f"{key}.npy"
        if f.is_file():
            return torch.from_numpy(np.load(f))
        wav = load_audio(path)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, wav.numpy())
        os.replace(tmp, f)
        return wav

    def __getitem__(self, i: int) -> dict | None:
        row = self.rows[i]
        try:
            wav = self.load(row["path"])
        except AudioError as e:
            if not self.skip_bad:
                raise
            self._skip(str(e))
            return None
        return {"wav": wav, "text": row["text"], "label": row["label"], "speaker": row["speaker"],
                "path": str(row["path"])}


def _missing_root(name: str, root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found at {root}. {what} Then point --data-dir at it. For an offline stand-in "
        f"in the same layout, run: python data.py synth --out DIR")


def _bad_row(file: Path, row: int, msg: str, skip: bool, pending: list[str]) -> None:
    """Report a bad index row: raise, or (skip_bad) keep it for the dataset's counted skips."""
    text = f"{file}, row {row}: {msg}"
    if not skip:
        raise ValueError(text)
    pending.append(text)


class FluentSpeechCommands(AudioDataset):
    """Fluent Speech Commands: root is the `fluent_speech_commands_dataset` folder.

    Label: "action object location", e.g. "activate lights kitchen" (31 distinct intents).
    """

    def __init__(self, root: str | Path, split: str = "train", skip_bad: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        root = Path(root)
        if (root / FSC_DIR).is_dir():   # also accept the folder that contains it
            root = root / FSC_DIR
        if split not in FSC_SPLITS:
            raise ValueError(f"FSC split must be one of {FSC_SPLITS}, got {split!r}")
        index = root / "data" / f"{split}_data.csv"
        if not index.is_file():
            raise _missing_root("Fluent Speech Commands", index,
                                "Download it from https://fluent.ai/fluent-speech-commands-a-dataset-for-"
                                "spoken-language-understanding-research/ and unpack it;")
        rows, bad = [], []
        with open(index, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in FSC_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{index}: header lacks columns {missing} "
                                 f"(expected ',{','.join(FSC_COLUMNS)}', got {reader.fieldnames})")
            for line, r in enumerate(reader, start=2):   # line 1 is the header
                empty = [c for c in FSC_COLUMNS if not (r.get(c) or "").strip()]
                if empty:
                    _bad_row(index, line, f"missing field(s) {empty}", skip_bad, bad)
                    continue
                rows.append({"path": root / r["path"], "text": r["transcription"],
                             "label": f"{r['action']} {r['object']} {r['location']}",
                             "speaker": r["speakerId"]})
        super().__init__(rows, skip_bad=skip_bad, cache_dir=cache_dir, bad_rows=bad)


class Slurp(AudioDataset):
    """SLURP: root is a clone of the SLURP repo with its audio next to it (dataset/slurp/*.jsonl,
    audio/slurp_real/). One item per recording; label = scenario + "_" + action.

    headset: True keeps only close-talk recordings (file names containing "headset"), False only
    the far-field ones, None all.
    """

    def __init__(self, root: str | Path, split: str = "train", headset: bool | None = None,
                 skip_bad: bool = False, cache_dir: str | Path | None = None) -> None:
        root = Path(root)
        if split not in (*SLURP_SPLITS, "train_synthetic"):
            raise ValueError(f"SLURP split must be one of {SLURP_SPLITS + ('train_synthetic',)}, got {split!r}")
        index = root / "dataset" / "slurp" / f"{split}.jsonl"
        if not index.is_file():
            raise _missing_root("SLURP", index, "Clone https://github.com/pswietojanski/slurp and fetch its "
                                "audio with scripts/download_audio.sh (audio/slurp_real, audio/slurp_synth);")
        audio_dir = root / "audio" / ("slurp_synth" if split == "train_synthetic" else "slurp_real")
        rows, bad = [], []
        with open(index) as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    r = json.loads(text)
                except json.JSONDecodeError as e:
                    _bad_row(index, line, f"invalid JSON ({e})", skip_bad, bad)
                    continue
                empty = [k for k in ("sentence", "scenario", "action", "recordings") if not r.get(k)]
                recs = r.get("recordings") or []
                if not empty and not all(isinstance(x, dict) and x.get("file") for x in recs):
                    empty = ["recordings[].file"]
                if empty:
                    _bad_row(index, line, f"missing field(s) {empty}", skip_bad, bad)
                    continue
                # the `intent` field sometimes holds only the action: rebuild it from its parts
                label = f"{r['scenario']}_{r['action']}"
                for rec in recs:
                    if headset is None or ("headset" in rec["file"]) == headset:
                        rows.append({"path": audio_dir / rec["file"], "text": r["sentence"],
                                     "label": label, "speaker": None})
        super().__init__(rows, skip_bad=skip_bad, cache_dir=cache_dir, bad_rows=bad)


class LibriSpeech(AudioDataset):
    """LibriSpeech: root holds LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    and the .flac files (root may also be the LibriSpeech folder itself). No labels."""

    def __init__(self, root: str | Path, subset: str = "train-clean-100", skip_bad: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        root = Path(root)
        base = root / "LibriSpeech" / subset if (root / "LibriSpeech").is_dir() else root / subset
        if not base.is_dir():
            raise _missing_root("LibriSpeech", base, f"Download {subset}.tar.gz from "
                                "https://www.openslr.org/12 and unpack it;")
        rows, bad = [], []
        for trans in sorted(base.glob("*/*/*.trans.txt")):
            with open(trans) as f:
                for line, text in enumerate(f, start=1):
                    utt, _, words = text.strip().partition(" ")
                    if not utt:
                        continue
                    if not words:
                        _bad_row(trans, line, "missing transcript", skip_bad, bad)
                        continue
                    rows.append({"path": trans.parent / f"{utt}.flac", "text": words, "label": None,
                                 "speaker": utt.split("-")[0]})
        if not rows and not bad:
            raise FileNotFoundError(f"{base}: no */*/*.trans.txt transcripts found")
        super().__init__(rows, skip_bad=skip_bad, cache_dir=cache_dir, bad_rows=bad)


class Manifest(AudioDataset):
    """A jsonl manifest, one utterance a line: {"audio": path, "text": ..., "label"?, "speaker"?}.
    Relative audio paths are resolved against the manifest's folder."""

    def __init__(self, path: str | Path, skip_bad: bool = False, cache_dir: str | Path | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} not found (expected a jsonl file with one "
                                    f'{{"audio": ..., "text": ...}} object per line)')
        rows, bad = [], []
        with open(path) as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    r = json.loads(text)
                except json.JSONDecodeError as e:
                    _bad_row(path, line, f"invalid JSON ({e})", skip_bad, bad)
                    continue
                empty = [k for k in ("audio", "text") if not isinstance(r, dict) or not r.get(k)]
                if empty:
                    _bad_row(path, line, f"missing field(s) {empty}", skip_bad, bad)
                    continue
                rows.append({"path": path.parent / r["audio"], "text": r["text"], "label": r.get("label"),
                             "speaker": r.get("speaker")})
        super().__init__(rows, skip_bad=skip_bad, cache_dir=cache_dir, bad_rows=bad)


# ----------------------------------------------------------------------------------------------
# 7. Batching
# ----------------------------------------------------------------------------------------------


# Waveform batches are padded to a multiple of this many samples (0.2 s, 10 encoder frames). On CPU,
# oneDNN builds its conv kernels for each new input shape, and the encoder's forward pass on a batch
# of a length it has not seen took about twice as long as on one it has (measured, tiny HuBERT); with
# few distinct lengths, almost every batch reuses kernels. The encoder ignores the padding (lengths).
WAV_PAD_MULTIPLE = 3200


def pad_batch(tensors: Sequence[torch.Tensor], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, ...) tensors into (B, L, ...), L = L_max rounded up to `multiple`, plus lengths (B,)."""
    lengths = torch.tensor([t.shape[0] for t in tensors])
    padded = torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)  # (B, L_max, ...)
    extra = -padded.shape[1] % multiple
    if extra:
        padded = torch.cat([padded, padded.new_zeros(padded.shape[0], extra, *padded.shape[2:])], dim=1)
    return padded, lengths


BUCKET_BATCHES = 50   # batches per bucket: sort this many batches' worth of items by length


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar-length items (little padding), reshuffled reproducibly every epoch.

    Each epoch: shuffle all indices with a generator seeded by (seed, epoch), cut them into
    buckets of BUCKET_BATCHES * batch_size, sort each bucket by length, cut it into batches, and
    shuffle the batch order. Every rank computes the same batch list and takes every
    world_size-th batch; the list is padded by repeating early batches (or, with drop_last,
    truncated) so all ranks get the same number of batches, as DistributedSampler does.
    Call set_epoch(e) before each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
            bucket = BUCKET_BATCHES * self.batch_size
        else:
            order, bucket = torch.arange(n), max(n, 1)
        batches = []
        for start in range(0, n, bucket):
            chunk = order[start:start + bucket]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]   # short to long
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.world_size > 1:
            if self.drop_last:
                batches = batches[:len(batches) - len(batches) % self.world_size]
            elif batches:
                pad = -len(batches) % self.world_size
                batches += (batches * (pad // len(batches) + 1))[:pad]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches()[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self._all_batches()[self.rank::self.world_size])


def collate(items: Sequence[dict | None]) -> dict:
    """Stack dataset items into a batch: wav (B, S_max) zero-padded, lengths (B,) in samples.

    The models thread `lengths` through every layer so the zero padding never leaks into results.
    None items (files a skip_bad dataset could not decode; it has counted and logged them) are
    left out.
    """
    items = [it for it in items if it is not None]
    if not items:
        raise ValueError("collate: empty batch (every item in it was skipped as bad)")
    wav, lengths = pad_batch([it["wav"] for it in items])   # (B, S_max), (B,)
    batch = {"wav": wav, "lengths": lengths}
    for key in ("text", "label", "speaker", "path"):
        batch[key] = [it.get(key) for it in items]
    return batch


# ----------------------------------------------------------------------------------------------
# 8. The micro world's text corpus
# ----------------------------------------------------------------------------------------------
#
# The micro world's tiny LM (train.py) must *learn in context from text* before Seal can transfer
# that skill to speech. It never sees audio: it reads documents made of the grammar's commands,
# always cut into the same text segments that seal.py and fewshot.py put in their prompts
# ("{input} => {label}\n" lines, and "[t] = [t]" for the KL copy target), so that the token
# sequences it learns on are exactly the ones it is later asked about. Four kinds of documents:
#
# - episodes: "utterance => label" lines over N intents with k lines each, then one more line.
#   Most (45% of all documents) use arbitrary words drawn per episode ("walnut"): then copying the
#   label of a matching demonstration is the only way to be right, which is what grows induction
#   heads; the others use natural labels ("activate lights kitchen"). Phrasings vary within an
#   episode, so "matching" means "same intent", not only "same string" (speech never repeats a
#   string exactly either);
# - labelled lines: random commands with their natural labels (fewshot.py's 31-way prompts);
# - copies: "t = t", a transcript repeated after the separator the Seal KL objective uses, and
#   random word sequences repeated the same way (copying anything, not just commands);
# - plain commands, one per line.

# Label words with no link to the task, for episodes where only in-context copying can be right.
ARBITRARY_LABELS = tuple(
    "apple river stone cloud tiger violet copper maple falcon ocean pepper silver rabbit candle forest "
    "marble winter garden pencil rocket lemon orange thunder meadow bottle planet shadow crystal dragon "
    "banana castle mirror velvet anchor butter cotton desert island jungle kettle ladder magnet needle "
    "oyster parrot quartz saddle turtle umbrella walnut yellow zebra bamboo cherry donkey engine feather "
    "hammer iceberg jacket kitten lizard monkey nickel olive panda radish salmon tomato valley wizard "
    "yogurt puzzle circle square purple green blue north south east west".split())

EPISODE_SHARE = 0.62       # documents that are few-shot episodes (natural or arbitrary labels)
FEWSHOT_SEPARATOR = " =>"   # "{input} => {label}\n", fewshot.py's default template
COPY_SEPARATOR = " ="       # "[t] = [t]": the separator of the Seal KL objective in the micro world


def transcription(text: str) -> str:
    """A command as the FSC CSV spells it (first letter upper case)."""
    return text[0].upper() + text[1:]


def label_segment(label: str) -> str:
    """The text after FEWSHOT_SEPARATOR on a labelled line: " label\\n" (the newline ends the line)."""
    return f" {label}\n"


def labelled_lines(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """[(utterance, label)] -> text segments: utterance, " =>", " label\\n" per line."""
    return [s for text, label in pairs for s in (transcription(text), FEWSHOT_SEPARATOR, label_segment(label))]


class LMCorpus:
    """An endless, reproducible stream of documents for the tiny LM (see above).

    arbitrary: the share of documents that are arbitrary-label episodes (at most EPISODE_SHARE)."""

    def __init__(self, grammar: Grammar, seed: int = 0, arbitrary: float = 0.45):
        if not 0 <= arbitrary <= EPISODE_SHARE:
            raise ValueError(f"LMCorpus: arbitrary share must be in [0, {EPISODE_SHARE}], got {arbitrary}")
        self.grammar, self.rng, self.arbitrary = grammar, random.Random(seed), arbitrary
        self.words = sorted({w for it in grammar.intents for t in it.templates for w in t.split()}
                            | set(ARBITRARY_LABELS))

    def document(self) -> list[str]:
        """One document, as the list of text segments that prompts are built from."""
        rng, intents = self.rng, self.grammar.intents
        kind = rng.random()
        if kind < EPISODE_SHARE:                      # N-way k-shot episode
            chosen = rng.sample(intents, rng.randint(2, 6))
            arbitrary = kind < self.arbitrary         # only in-context copying can be right
            labels = rng.sample(ARBITRARY_LABELS, len(chosen)) if arbitrary else [it.label for it in chosen]
            # a few phrasings per intent, so that some lines repeat exactly: induction heads form on
            # exact repeats first, then generalize to paraphrases
            phrasings = [rng.sample(it.templates, min(len(it.templates), rng.randint(1, 3))) for it in chosen]
            shots = rng.randint(1, 5)
            pairs = [(rng.choice(p), y) for p, y in zip(phrasings, labels) for _ in range(shots)]
            rng.shuffle(pairs)
            q = rng.randrange(len(chosen))
            query = rng.choice(phrasings[q] if rng.random() < 0.5 else chosen[q].templates)
            return labelled_lines(pairs + [(query, labels[q])])
        if kind < 0.67:                               # labelled lines, natural labels
            lines = [rng.choice(intents) for _ in range(rng.randint(1, 8))]
            return labelled_lines([(rng.choice(it.templates), it.label) for it in lines])
        if kind < 0.87:                               # copy a transcript
            t = transcription(rng.choice(rng.choice(intents).templates))
            return [t, COPY_SEPARATOR, f" {t}\n"]
        if kind < 0.95:                               # copy random words
            words = " ".join(rng.sample(self.words, rng.randint(2, 9)))
            return [words, COPY_SEPARATOR, f" {words}\n"]
        return [transcription(rng.choice(rng.choice(intents).templates)) + "\n"  # plain commands
                for _ in range(rng.randint(1, 4))]


# ----------------------------------------------------------------------------------------------
# 9. MFCC features (the targets of HuBERT's first pre-training iteration)
# ----------------------------------------------------------------------------------------------
#
# HuBERT learns by predicting, at masked frames, the k-means cluster of each frame. In its first
# iteration the clustered features are MFCCs: a compact description of the spectral envelope
# (which formants, hence which phone) that throws away pitch. The recipe, per frame:
#   pre-emphasis x[n] - 0.97 x[n-1] (lifts high frequencies) -> 25 ms Hamming window ->
#   |FFT|^2 -> 40 triangular filters equally spaced on the mel scale (2595 log10(1 + f / 700)) ->
#   log -> DCT-II (orthonormal), keep 13 coefficients -> append deltas and delta-deltas (39 dims).
# Frames advance by 20 ms (320 samples), the hop of the HuBERT encoder, so frame t of the MFCC
# and frame t of the model start at the same sample and the cluster ids line up with its frames.

MFCC_WINDOW = RECEPTIVE_FIELD  # 400 samples: 25 ms, what one HuBERT frame sees
MFCC_HOP = HOP_LENGTH          # 320 samples: 20 ms, one MFCC frame per HuBERT frame
MFCC_N_FFT = 512     # the next power of two above the window
MFCC_N_MELS = 40
MFCC_N_CEPS = 13
MFCC_DIM = 3 * MFCC_N_CEPS  # 39: coefficients, deltas, delta-deltas
PRE_EMPHASIS = 0.97
MEL_FMIN, MEL_FMAX = 20.0, SAMPLE_RATE / 2
DELTA_WIDTH = 2      # deltas regress over +-2 frames


def mel_filterbank(n_mels: int = MFCC_N_MELS, n_fft: int = MFCC_N_FFT, sr: int = SAMPLE_RATE,
                   fmin: float = MEL_FMIN, fmax: float = MEL_FMAX) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, equally spaced on the (HTK) mel scale."""
    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)
    edges = 700.0 * (10 ** (torch.linspace(mel(fmin), mel(fmax), n_mels + 2, dtype=torch.float64) / 2595.0) - 1)
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sr / n_fft
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - low) / (centre - low), (high - freqs) / (high - centre)
    return torch.minimum(rising, falling).clamp(min=0).float()


def dct_matrix(n_in: int = MFCC_N_MELS, n_out: int = MFCC_N_CEPS) -> torch.Tensor:
    """(n_out, n_in) orthonormal DCT-II: c_k = s_k sum_n x_n cos(pi k (2n + 1) / (2 n_in))."""
    n = torch.arange(n_in, dtype=torch.float64)
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    m = torch.cos(math.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.float()


def deltas(c: torch.Tensor, width: int = DELTA_WIDTH) -> torch.Tensor:
    """(T, D) -> (T, D) regression slope over +-width frames, edges repeated:
    d_t = sum_i i (c_{t+i} - c_{t-i}) / (2 sum_i i^2)."""
    T = c.shape[0]
    p = torch.cat([c[:1].expand(width, -1), c, c[-1:].expand(width, -1)])
    num = sum(i * (p[width + i: width + i + T] - p[width - i: width - i + T]) for i in range(1, width + 1))
    return num / (2 * sum(i * i for i in range(1, width + 1)))


def mfcc(wav: torch.Tensor) -> torch.Tensor:
    """(S,) waveform at 16 kHz -> (T, 39) MFCC + deltas + delta-deltas, T = (S - 400) // 320 + 1."""
    if wav.dim() != 1 or wav.shape[0] < MFCC_WINDOW:
        raise ValueError(f"mfcc: expected a 1-D waveform of >= {MFCC_WINDOW} samples, got shape {tuple(wav.shape)}")
    wav = wav.float()
    x = torch.cat([wav[:1], wav[1:] - PRE_EMPHASIS * wav[:-1]])
    frames = x.unfold(0, MFCC_WINDOW, MFCC_HOP) * torch.hamming_window(MFCC_WINDOW, periodic=False)  # (T, 400)
    power = torch.fft.rfft(frames, n=MFCC_N_FFT).abs().square()  # (T, 257)
    log_mel = torch.log(power @ mel_filterbank().T + 1e-6)  # (T, 40); the floor keeps silence finite
    c = log_mel @ dct_matrix().T  # (T, 13)
    d = deltas(c)
    return torch.cat([c, d, deltas(d)], dim=1)  # (T, 39)


# ----------------------------------------------------------------------------------------------
# 10. Command line
# ----------------------------------------------------------------------------------------------


def synth_main(args: argparse.Namespace) -> None:
    counts = {"train": args.n_train, "valid": args.n_valid, "test": args.n_test}
    n_voices = [int(x) for x in args.voices.split(",")]
    if len(n_voices) != 3 or min(n_voices) < 1:
        raise ValueError(f"--voices needs three positive counts train,valid,test, got {args.voices!r}")
    if "slurp" in args.sets and min(n_voices) < args.recordings:
        raise ValueError(f"--voices {args.voices}: each split needs >= --recordings {args.recordings} "
                         f"voices, since each SLURP sentence is recorded by different voices")
    voices = split_voices(*n_voices, seed=args.seed)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir() / "speech")
    out = Path(args.out)
    if "fsc" in args.sets:
        root = write_fsc(out, counts, voices, seed=args.seed, cache_dir=cache, progress=True, parallel=args.jobs)
        print(f"FSC-style set: {root}  (train {args.n_train} / valid {args.n_valid} / test {args.n_test})")
    if "slurp" in args.sets:
        slurp_voices = {"train": voices["train"], "devel": voices["valid"], "test": voices["test"]}
        slurp_counts = {"train": args.n_train, "devel": args.n_valid, "test": args.n_test}
        root = write_slurp(out, slurp_counts, slurp_voices, seed=args.seed, recordings=args.recordings,
                           audio_format=args.slurp_format, cache_dir=cache, progress=True, parallel=args.jobs)
        print(f"SLURP-style set: {root}  ({args.recordings} recordings per sentence)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Audio and datasets for Seal.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write synthetic FSC- and SLURP-style sets in the real layouts",
                       description="Render command grammars with espeak-ng voices and write "
                                   "<out>/fluent_speech_commands_dataset and <out>/slurp, in the real "
                                   "datasets' layouts. Voices are disjoint across the splits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=2000, help="utterances (SLURP: sentences) in train")
    p.add_argument("--n-valid", type=int, default=300, help="... in valid (SLURP: devel)")
    p.add_argument("--n-test", type=int, default=300, help="... in test")
    p.add_argument("--voices", default="24,6,6", help="number of voices (speakers) train,valid,test")
    p.add_argument("--sets", default="fsc,slurp", help="comma-separated: fsc, slurp")
    p.add_argument("--recordings", type=int, default=2, help="SLURP recordings per sentence (first = headset)")
    p.add_argument("--slurp-format", default="flac", choices=["flac", "wav"], help="SLURP audio format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="parallel espeak render workers (default: CPU count)")
    p.add_argument("--cache-dir", help="rendered-speech cache (default $SEAL_CACHE/speech)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the speech cache")
    args = parser.parse_args(argv)
    bad_sets = set(args.sets.split(",")) - {"fsc", "slurp"} if args.command == "synth" else set()
    try:
        if bad_sets:
            raise ValueError(f"--sets: unknown {sorted(bad_sets)} (choose from fsc, slurp)")
        synth_main(args)
    except (ValueError, FileNotFoundError, ImportError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
