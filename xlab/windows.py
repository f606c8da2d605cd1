"""Training examples cut from a split's memory-mapped tokens, and the order in which training draws them.

A split on disk is `{split}.bin` (every document's tokens followed by the end-of-document token, back to
back) and `{split}.idx` (uint64 document offsets into it: n_documents + 1 values starting at 0), described by
`{split}.json` (`read_manifest`), written last.
Examples are (x, y) pairs of int64 tensors of length `context`, y being x shifted by one token;
y is -100 where nothing is to be predicted (padding), which cross-entropy ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IGNORE_INDEX = -100  # targets the loss skips: F.cross_entropy(..., ignore_index=-100)
# the layout of a split's files and manifest: a cache of another version is rebuilt (in a new folder: the cache key
# holds it). 2: version 1's parallel encoding (data.num_proc > 1) gave a special token's string in a document the
# special id (tokenizers' pickling drops encode_special_tokens), so such caches are not reused
CACHE_VERSION = 2


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of a split's token file: uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_manifest(folder: Path, name: str, tokenizer_sha: str) -> tuple[dict | None, str]:
    """A split's manifest if its files are complete and were encoded by this tokenizer, else (None, why)."""
    path = folder / f"{name}.json"
    if not path.is_file():
        return None, "not prepared"
    try:
        manifest = json.loads(path.read_text())
        if manifest["version"] != CACHE_VERSION:
            return None, f"in an old cache format (version {manifest['version']})"
        if manifest["tokenizer_sha256"] != tokenizer_sha:
            return None, "encoded with another tokenizer"
        for suffix, size in ((".bin", manifest["bin_bytes"]), (".idx", manifest["idx_bytes"])):
            file = folder / f"{name}{suffix}"
            if not file.is_file() or file.stat().st_size != size:
                return None, f"incomplete ({file.name} is missing or has the wrong size)"
    except (ValueError, KeyError, TypeError):
        return None, "unreadable (corrupt manifest)"
    return manifest, "ok"


class SplitTokens:
    """A split's token and offset files, mapped lazily: each DataLoader worker maps them itself
    rather than receiving a pickled copy, and only the pages actually read occupy memory."""

    REMAP_EVERY = 64  # reads between fresh mappings of the token file (see `read`)

    def __init__(self, bin_path: str | Path, idx_path: str | Path, dtype: np.dtype):
        self.bin_path, self.idx_path, self.dtype = Path(bin_path), Path(idx_path), np.dtype(dtype)
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._reads = 0

    @staticmethod
    def _map(path: Path, dtype: np.dtype) -> np.ndarray:
        # np.memmap refuses empty files; an empty split is a valid (if useless) split
        return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = self._map(self.bin_path, self.dtype)
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = self._map(self.idx_path, np.dtype(np.uint64))
        return self._offsets

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens[start:stop]. Pages read through a mapping stay in the process's resident set
        until it is unmapped (the kernel even maps neighbouring pages), so random reads over a long run
        would grow RSS towards the file's size; a fresh mapping every few reads keeps it flat (nanoGPT
        recreates its memmap every batch for the same reason)."""
        self._reads += 1
        if self._reads % self.REMAP_EVERY == 0:
            self.release()
        return np.array(self.tokens[start:stop])

    def release(self) -> None:
        """Unmap the token file (the next access maps it again), releasing the pages read so far."""
        self._tokens = None

    @property
    def n_documents(self) -> int:
        return max(0, len(self.offsets) - 1)

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens, its end-of-document token included."""
        return self.read(int(self.offsets[d]), int(self.offsets[d + 1]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_offsets": None, "_reads": 0}


def as_tensor(tokens: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tokens.astype(np.int64))


class PackedWindows(Dataset):
    """Documents back to back, cut into windows of `context` tokens: window i is
    tokens[i * context : (i + 1) * context + 1], split into x and y. No padding, nothing ignored."""

    def __init__(self, split: SplitTokens, context: int):
        self.split, self.context = split, context

    def __len__(self) -> int:
        return max(0, (len(self.split.tokens) - 1) // self.context)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.context
        chunk = as_tensor(self.split.read(start, start + self.context + 1))
        return chunk[:-1], chunk[1:]


class PaddedWindows(Dataset):
    """One document at a time, padded: the sequence end-of-document + document (whose last token is the
    end-of-document) is cut into windows of `context` inputs; a document never shares a window.
    The leading end-of-document token plays the role it has in packed windows: "a document starts here".
    Inputs are padded with `pad_id`, targets with -100 (ignored by the loss)."""

    def __init__(self, split: SplitTokens, context: int, pad_id: int):
        self.split, self.context, self.pad_id = split, context, pad_id
        lengths = np.diff(split.offsets.astype(np.int64))  # tokens per document, end-of-document included
        windows = -(-lengths // context)  # a document of L tokens predicts L targets: ceil(L / context) windows
        self.first_window = np.concatenate([[0], np.cumsum(windows)])

    def __len__(self) -> int:
        return int(self.first_window[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = int(np.searchsorted(self.first_window, i, side="right")) - 1
        doc = self.split.document(d)
        v = (i - int(self.first_window[d])) * self.context  # window start in the sequence [eos] + doc
        chunk = doc[max(v - 1, 0): v + self.context]
        if v == 0:
            chunk = np.concatenate([[doc[-1]], chunk])  # doc[-1] is the end-of-document token
        x = torch.full((self.context,), self.pad_id, dtype=torch.int64)
        y = torch.full((self.context,), IGNORE_INDEX, dtype=torch.int64)
        chunk = as_tensor(chunk)
        x[: len(chunk) - 1], y[: len(chunk) - 1] = chunk[:-1], chunk[1:]
        return x, y


class IgnoredPadding(Dataset):
    """`windows` followed by windows that predict nothing, up to a multiple of `ranks` windows in all: a
    DistributedSampler over it, unshuffled, then gives every rank as many windows (so as many batches) and each
    real window to one rank once. Evaluation needs both: a sharded (FSDP) forward pass needs every rank, and a
    repeated window would count twice. A padding window is the first window's inputs (valid ids) with every
    target IGNORE_INDEX: it adds no loss, no target, no byte and nothing to accuracy."""

    def __init__(self, windows: Dataset, ranks: int):
        self.windows, self.length = windows, -(-len(windows) // ranks) * ranks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < len(self.windows):
            return self.windows[i]
        if not i < self.length:
            raise IndexError(i)
        x, _ = self.windows[0]
        return x, torch.full_like(x, IGNORE_INDEX)


class Prompts(Dataset):
    """Prompts for generation: each item is {"text": str, "ids": LongTensor}."""

    def __init__(self, texts: list[str], ids: list[list[int]] | list[np.ndarray]):
        self.texts, self.ids = texts, ids

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.texts[i], "ids": torch.as_tensor(np.asarray(self.ids[i], dtype=np.int64))}


def collate_prompts(items: list[dict]) -> dict[str, list]:
    """Prompts differ in length, so a batch keeps them as lists instead of stacking them."""
    return {"text": [it["text"] for it in items], "ids": [it["ids"] for it in items]}


class ShuffledSampler(DistributedSampler):
    """Training order: a seeded permutation of the windows per epoch, resumable mid-epoch on any number of ranks.

    Epoch e's order is drawn from (seed, e) alone. Rank r of R takes positions r, r + R, r + 2R, ... of it,
    so ranks never share a window, and after each rank has drawn k windows, the first k * R of the
    permutation have been seen. A resumed epoch continues after its first `seen` windows, which rank r of R
    then takes from position seen + r in steps of R: whatever R was before, no window is drawn twice and none
    is skipped, except that, as in every epoch, the last (windows - seen) % R are left out so that every rank
    draws as many (and the DataLoader drops each rank's last partial batch: fewer than R x batch size windows
    in all are left at the end of an epoch).
    Being a DistributedSampler, Lightning leaves it in place under DDP and calls `set_epoch` on it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resume_epoch, self.resume_seen, self.resume_counted = -1, 0, 0

    def resume(self, epoch: int, seen: int, counted: int = 0) -> None:
        """Continue epoch `epoch` after its first `seen` windows (all ranks together), of which the training loop
        counts `counted` per rank (the batches it has done x batch size)."""
        self.set_epoch(epoch)  # before Lightning does: DataLoader workers may draw indices when the loader is created
        self.resume_epoch, self.resume_seen, self.resume_counted = epoch, seen, counted

    def order(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's windows for an epoch, in order, after the epoch's first `start` windows (all ranks)."""
        rest = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))[start:]
        return rest[: len(rest) - len(rest) % self.num_replicas][self.rank:: self.num_replicas]

    def __iter__(self):
        order = self.order(self.epoch, self.resume_seen if self.epoch == self.resume_epoch else 0)
        self.resume_epoch = -1  # only once: a later pass over this epoch number starts at its beginning
        return map(int, order)  # lazily: a Python list of a big epoch's indices would cost ~36 bytes each

    def __len__(self) -> int:
        # the whole epoch even when resuming, so that Lightning's count of batches per epoch stays right. Resumed on
        # more ranks, each has more windows left than that count allows after the batches it counts as done: longer
        # then, or the loop would end the epoch early (an epoch also ends when the sampler does)
        if self.resume_epoch < 0:
            return self.num_samples
        left = (len(self.dataset) - self.resume_seen) // self.num_replicas
        return max(self.num_samples, self.resume_counted + left)


class ResumableLoader(DataLoader):
    """The training DataLoader. Its position is saved and restored by the DataModule (whose `state_dict`
    counts the batches the training loop has actually processed, which a loader cannot know with
    prefetching); declaring the loader stateful tells Lightning that resuming mid-epoch is supported."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
