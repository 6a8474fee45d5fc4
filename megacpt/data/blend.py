"""Weighted blends of GPT datasets with exact ratios and blend-changing resume.

`--data-path` words: `W1 P1 W2 P2 ...` (weights + prefixes, weights normalised) or
`P1 P2 ...` (prefixes alone, weighted by their token counts). A prefix may be written
`name=PREFIX`; otherwise its name is the basename with `_text_document` stripped
(`/data/zh_text_document` -> "zh").

Assignment: global sample i of a blend *segment* goes to the dataset d maximising
`w_d * (i + 1) - n_d` (ties to the first), where n_d counts the segment's earlier picks of
d; it takes d's sample number `offset_d + n_d`. Hence after every k samples of a segment,
|n_d - w_d * k| < 1 for every d: a 0.3 replay weight is 30% of samples at every step.

Resume: `state_dict()` holds the global position and, per dataset, how many of its samples
were consumed. `load_state_dict()` continues the same segment when the weights are
unchanged (the stream is then identical to an uninterrupted run); with different weights it
starts a new segment at the saved position whose offsets are the consumed counts, so every
dataset continues exactly where it stopped (nothing repeated or skipped) and the new ratios
hold exactly from the resume point (Megatron instead skips global samples of a rebuilt
blend, which replays and drops data once the weights change; its PR #725).

State dict (JSON-serialisable):
    {"consumed_samples": int,                       # global samples consumed
     "consumed_samples_per_dataset": {name: int},   # includes datasets no longer blended
     "segment": {"start": int, "offsets": {name: int}, "weights": {name: float}}}
"""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from megacpt.data.indexed import IndexedDataset, strip_suffix

logger = logging.getLogger(__name__)

try:  # optional JIT for the sequential greedy loop; results are identical without it
    import numba as _numba
except ImportError:  # pragma: no cover - depends on the environment
    _numba = None


def _is_float(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def dataset_name(prefix: str) -> str:
    """Default dataset name: basename without `_text_document` (or `_document`)."""
    base = os.path.basename(strip_suffix(prefix))
    for suffix in ("_text_document", "_document"):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def split_name(word: str) -> tuple[str, str]:
    """'zh=/data/zh_text_document' -> ('zh', prefix); a bare prefix gets its default name."""
    name, sep, prefix = word.partition("=")
    if sep and name and "/" not in name:
        return name, strip_suffix(prefix)
    return dataset_name(word), strip_suffix(word)


def parse_named_data_path(words: list[str] | str) -> list[tuple[str, float, str]]:
    """[(name, normalised weight, prefix)] from --data-path words (see module doc)."""
    words = words.split() if isinstance(words, str) else [w for w in words if w]
    if not words:
        raise ValueError("--data-path: no datasets given")
    floats = [_is_float(w) for w in words]
    if len(words) % 2 == 0 and all(floats[0::2]) and not any(floats[1::2]):
        entries = [(float(w), p) for w, p in zip(words[0::2], words[1::2])]
    elif any(floats):
        raise ValueError(f"--data-path {' '.join(words)!r}: expected weight/prefix pairs "
                         f"'W1 P1 W2 P2 ...' or prefixes only 'P1 P2 ...'")
    else:
        entries = [(float(IndexedDataset(split_name(w)[1]).num_tokens), w) for w in words]
    if any(w < 0 or not math.isfinite(w) for w, _ in entries):
        raise ValueError(f"--data-path: weights must be finite and >= 0, got "
                         f"{[w for w, _ in entries]}")
    total = sum(w for w, _ in entries)
    if total <= 0:
        raise ValueError("--data-path: the weights (or the datasets' token counts) sum to 0")
    named = [(*split_name(p), w / total) for w, p in entries]
    names = [n for n, _, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--data-path: several prefixes are named {dupes}; write them as "
                         f"name=PREFIX to tell them apart")
    return [(n, w, p) for n, p, w in named]


def parse_data_path(words: list[str] | str) -> list[tuple[float, str]]:
    """[(normalised weight, prefix)] from --data-path words."""
    return [(w, p) for _, w, p in parse_named_data_path(words)]


def _greedy(weights: np.ndarray, size: int, out_d: np.ndarray, out_s: np.ndarray) -> None:
    counts = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        t = i + 1.0
        best, best_err = 0, weights[0] * t - counts[0]
        for d in range(1, len(weights)):
            err = weights[d] * t - counts[d]
            if err > best_err:
                best, best_err = d, err
        out_d[i] = best
        out_s[i] = counts[best]
        counts[best] += 1


_greedy_jit = _numba.njit(cache=True, nogil=True)(_greedy) if _numba is not None else None


def blend_indices(weights, size: int, use_jit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int32|int64 [size]) of the greedy
    blend (int32 while size < 2**31: 6 bytes per sample)."""
    w = np.asarray(weights, dtype=np.float64)
    if not 0 < len(w) <= np.iinfo(np.int16).max:
        raise ValueError(f"a blend needs 1 to 32767 datasets, got {len(w)}")
    w = w / w.sum()
    out_d = np.empty(size, dtype=np.int16)
    out_s = np.empty(size, dtype=np.int32 if size < 2**31 else np.int64)
    t0 = time.time()
    if use_jit and _greedy_jit is not None:
        _greedy_jit(w, size, out_d, out_s)
    else:
        step = 1 << 20
        for begin in range(0, size, step):  # python fallback: same loop, with progress
            end = min(begin + step, size)
            d, s = np.empty(end - begin, np.int16), np.empty(end - begin, out_s.dtype)
            _greedy_resume(w, begin, end, out_d[:begin], d, s)
            out_d[begin:end], out_s[begin:end] = d, s
            if size > step:
                dt = time.time() - t0
                logger.info("blend index %d/%d samples (%.0f/s, ETA %.0f s)", end, size,
                            end / dt, dt * (size - end) / end)
    return out_d, out_s


def _greedy_resume(w, begin, end, done_d, out_d, out_s) -> None:
    counts = np.bincount(done_d, minlength=len(w)).astype(np.int64).tolist()
    wl = w.tolist()
    for k, i in enumerate(range(begin, end)):
        t = i + 1.0
        best, best_err = 0, wl[0] * t - counts[0]
        for d in range(1, len(wl)):
            err = wl[d] * t - counts[d]
            if err > best_err:
                best, best_err = d, err
        out_d[k], out_s[k] = best, counts[best]
        counts[best] += 1


class BlendedDataset:
    """Global sample stream over named datasets; `ds[i]` = member sample + {"dataset": name}.

    size: length of the global stream (e.g. train_iters * global_batch_size).
    consumed: per-dataset samples already used before this blend's first sample (a fresh
    segment starting at global sample 0 with these offsets).
    state: a `state_dict()` to resume from (same as calling `load_state_dict`, but the
    members only need the samples the resumed stream uses; see `required_samples`).
    """

    def __init__(self, datasets: dict, weights: dict[str, float], size: int,
                 consumed: dict[str, int] | None = None, state: dict | None = None):
        missing = sorted(set(datasets) ^ set(weights))
        if missing:
            raise ValueError(f"BlendedDataset: datasets and weights must name the same sets; "
                             f"mismatched names {missing}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"BlendedDataset: weights must be >= 0 and not all 0: {weights}")
        self.datasets, self.names = datasets, list(datasets)
        total = float(sum(weights.values()))
        self.weights = {n: float(weights[n]) / total for n in self.names}
        self.size = int(size)
        self.consumed_samples = 0
        self._carry: dict[str, int] = {}
        if state:
            if consumed:
                raise ValueError("BlendedDataset: pass either consumed or state, not both")
            self.load_state_dict(state)
        else:
            self._segment(0, dict(consumed or {}))

    def _segment(self, start: int, offsets: dict[str, int]) -> None:
        if not 0 <= start <= self.size:
            raise ValueError(f"BlendedDataset: resume position {start} outside [0, {self.size}]")
        self.start = int(start)
        self.offsets = {n: int(offsets.get(n, 0)) for n in self.names}
        self._carry = {n: int(c) for n, c in offsets.items() if n not in self.datasets}
        w = [self.weights[n] for n in self.names]
        self.dataset_index, self.dataset_sample_index = blend_indices(w, self.size - start)
        counts = np.bincount(self.dataset_index, minlength=len(self.names))
        for k, name in enumerate(self.names):
            need = self.offsets[name] + int(counts[k])
            if need > len(self.datasets[name]):
                raise ValueError(
                    f"BlendedDataset: dataset {name!r} has {len(self.datasets[name])} samples "
                    f"but the blend needs {need} ({self.offsets[name]} already consumed + "
                    f"{int(counts[k])}); build it with num_samples from required_samples()")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not self.start <= i < self.size:
            raise IndexError(f"blend sample {i} outside [{self.start}, {self.size}) (this blend "
                             f"resumed at global sample {self.start})")
        k = i - self.start
        name = self.names[int(self.dataset_index[k])]
        sample = dict(self.datasets[name][self.offsets[name] + int(self.dataset_sample_index[k])])
        sample["dataset"] = name
        return sample

    def set_consumed_samples(self, consumed_samples: int) -> None:
        """Called by the loader with the global position of the last yielded batch."""
        self.consumed_samples = int(consumed_samples)

    def consumed_per_dataset(self, consumed_samples: int) -> dict[str, int]:
        """Samples taken from each dataset (carried-over ones included) before global
        sample `consumed_samples`."""
        k = min(max(int(consumed_samples) - self.start, 0), self.size - self.start)
        counts = np.bincount(self.dataset_index[:k], minlength=len(self.names))
        out = dict(self._carry)
        out.update({n: self.offsets[n] + int(counts[j]) for j, n in enumerate(self.names)})
        return out

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        pos = self.consumed_samples if consumed_samples is None else int(consumed_samples)
        return {"consumed_samples": pos,
                "consumed_samples_per_dataset": self.consumed_per_dataset(pos),
                "segment": {"start": self.start, "offsets": {**self._carry, **self.offsets},
                            "weights": dict(self.weights)}}

    def load_state_dict(self, state: dict) -> None:
        start, offsets = resume_plan(state, self.weights)
        self._segment(start, offsets)
        self.consumed_samples = int(state.get("consumed_samples", 0))


def resume_plan(state: dict | None, weights: dict[str, float]) -> tuple[int, dict[str, int]]:
    """(segment start, per-dataset offsets) a blend with normalised `weights` resumes with."""
    if not state:
        return 0, {}
    for key in ("consumed_samples", "consumed_samples_per_dataset"):
        if key not in state:
            raise ValueError(f"blend state: missing {key!r} (got keys {sorted(state)})")
    seg = state.get("segment")
    if seg and set(seg["weights"]) == set(weights) and all(
            math.isclose(seg["weights"][n], w, rel_tol=1e-9, abs_tol=1e-12)
            for n, w in weights.items()):
        return int(seg["start"]), dict(seg["offsets"])
    return int(state["consumed_samples"]), dict(state["consumed_samples_per_dataset"])


def required_samples(weights: dict[str, float], size: int,
                     state: dict | None = None) -> dict[str, int]:
    """Samples each dataset must provide for a blend of `size` (resuming from `state`)."""
    total = float(sum(weights.values()))
    start, offsets = resume_plan(state, {n: w / total for n, w in weights.items()})
    n = max(size - start, 0)
    return {name: int(offsets.get(name, 0)) + math.ceil(w / total * n) + 1
            for name, w in weights.items()}
