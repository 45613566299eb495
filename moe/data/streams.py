"""Token streams: packing documents into sequences, domain ids, and the training schedules.

Packing: per domain, documents become one stream `BOS doc EOS BOS doc EOS ...`, cut into windows
of `seq_len + 1` tokens that overlap by one token (input = window[:-1], target = window[1:]), so
every token after the first is a target exactly once. Training drops the ragged tail; held-out
data pads it (targets IGNORE_INDEX) so evaluation covers every held-out byte.

Schedules: the b-th sequence of training batch i is a pure function of (seed, i, b). Resuming at
step i is just starting the iterator at i (cheap: no replay), and any number of dataloader
workers or distributed ranks can produce disjoint batches without talking to each other.
Within a domain, draws walk through a fresh permutation of its sequences each epoch, so no
sequence repeats before all others were seen.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from moe.config import DOMAINS, ConfigError, DataConfig
from moe.data.documents import Document
from moe.data.tokenizer import IGNORE_INDEX

SLOT_BLOCK = 8192  # mixed stream: domain choices are drawn in blocks of this many sequences


def domain_names(cfg: DataConfig) -> list[str]:
    """Global, stable domain ids: the built-in domains, then extra `sources` domains sorted.

    The id of a domain is its index here, independent of which domains a run trains on, so a
    branch trained on `code` alone and the full mixture agree on what domain 1 means.
    """
    extra = sorted(d for d in cfg.sources if d not in DOMAINS)
    return list(DOMAINS) + extra


def pack(docs: list[Document] | tuple[Document, ...], tokenizer) -> np.ndarray:
    """`BOS doc EOS BOS doc EOS ...` as one array (uint16 when the vocabulary fits)."""
    return pack_with_bytes(docs, tokenizer)[0]


def pack_with_bytes(docs: list[Document] | tuple[Document, ...],
                    tokenizer) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """(packed tokens, bytes each token covers or None).

    Tokenizers that measure what each token covers (`encode_many`, see moe.data.tokenizer) give
    the second array, aligned with the tokens: BOS 0, each token its count, EOS whatever of its
    document no token covered. The byte tokenizer gives None: its `byte_lengths` table is exact.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    bos, eos = np.array([tokenizer.bos_id], dtype), np.array([tokenizer.eos_id], dtype)
    many = getattr(tokenizer, "encode_many", None)
    if many is None:
        fast = getattr(tokenizer, "encode_np", None)
        parts = []
        for d in docs:
            body = fast(d.data) if fast else np.asarray(tokenizer.encode(d.data))
            parts += [bos, body.astype(dtype, copy=False), eos]
        return (np.concatenate(parts) if parts else np.zeros(0, dtype)), None
    parts, counts = [], []
    zero = np.zeros(1, np.int32)
    for d, (ids, nb) in zip(docs, many([d.data for d in docs])):
        parts += [bos, ids.astype(dtype), eos]
        counts += [zero, nb.astype(np.int32), np.array([len(d.data) - int(nb.sum())], np.int32)]
    if not parts:
        return np.zeros(0, dtype), np.zeros(0, np.int32)
    return np.concatenate(parts), np.concatenate(counts)


def tokenize_units(units: list[bytes], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, offsets (n + 1,), bytes (n,)) of n documents, each tokenized alone with no
    special token: document i is tokens[offsets[i]:offsets[i + 1]] and covers bytes[i] bytes.
    What the rolling scorer reads (moe.eval.rolling)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    many = getattr(tokenizer, "encode_many", None)
    fast = getattr(tokenizer, "encode_np", None)
    if many is not None:
        parts = [ids for ids, _ in many(list(units))]
    else:
        parts = [fast(u) if fast else np.asarray(tokenizer.encode(u)) for u in units]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (np.concatenate([np.asarray(p).astype(dtype, copy=False) for p in parts])
              if parts else np.zeros(0, dtype))  # fmt: skip
    return tokens, offsets, np.array([len(u) for u in units], dtype=np.int64)


class PackedSequences:
    """Windows of `seq_len + 1` tokens over one domain's packed stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, domain_id: int,
                 byte_lengths: np.ndarray | None, pad_id: int, pad_tail: bool = False,
                 token_bytes: np.ndarray | None = None):  # fmt: skip
        self.tokens = tokens
        self.seq_len = seq_len
        self.domain_id = domain_id
        # per-token byte counts aligned with `tokens` (pack_with_bytes), else the per-id table
        self.token_bytes = token_bytes
        self.byte_lengths = (None if byte_lengths is None
                             else torch.as_tensor(byte_lengths, dtype=torch.long))  # fmt: skip
        self.pad_id = pad_id
        n_targets = max(len(tokens) - 1, 0)
        self.n = -(-n_targets // seq_len) if pad_tail else n_targets // seq_len

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (T,), targets (T,)) of sequence i."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        T = self.seq_len
        w = torch.from_numpy(self.tokens[i * T : i * T + T + 1].astype(np.int64))
        x, y = w[:-1], w[1:]
        if len(y) < T:  # the held-out tail
            x = torch.cat([x, torch.full((T - len(x),), self.pad_id, dtype=torch.long)])
            y = torch.cat([y, torch.full((T - len(y),), IGNORE_INDEX, dtype=torch.long)])
        return x, y

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids (T,), targets (T,), bytes each target covers (T,), 0 where none)."""
        x, y = self.get(i)
        valid = y != IGNORE_INDEX
        if self.token_bytes is not None:
            T = self.seq_len
            b = torch.from_numpy(self.token_bytes[i * T + 1 : i * T + T + 1].astype(np.int64))
            b = torch.cat([b, torch.zeros(T - len(b), dtype=torch.long)])
        else:
            b = self.byte_lengths[y.clamp(min=0)]
        return x, y, b * valid


def make_batch(seqs: list[tuple[torch.Tensor, ...]], domains: list[int],
               byte_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Stack (input, target[, target bytes]) rows; without per-target bytes, `byte_lengths`
    (the tokenizer's per-id table) gives them."""
    x = torch.stack([s[0] for s in seqs])  # (B, L)
    y = torch.stack([s[1] for s in seqs])  # (B, L)
    if all(len(s) > 2 for s in seqs):
        nbytes = torch.stack([s[2] for s in seqs]).sum(-1)  # (B,)
    else:
        nbytes = (byte_lengths[y.clamp(min=0)] * (y != IGNORE_INDEX)).sum(-1)  # (B,)
    return {"input_ids": x, "targets": y, "domain": torch.tensor(domains, dtype=torch.long),
            "target_bytes": nbytes}


# ----------------------------------------------------------------------------- schedules


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@lru_cache(maxsize=64)
def _permutation(seed: int, domain_id: int, epoch: int, n: int) -> np.ndarray:
    return _rng(seed, 1, domain_id, epoch).permutation(n)


def draw_index(seed: int, domain_id: int, k: int, n: int) -> int:
    """The k-th training draw from a domain with n sequences: epoch-wise permutations."""
    epoch, pos = divmod(k, n)
    return int(_permutation(seed, domain_id, epoch, n)[pos])


class MixedSlots:
    """Which domain fills global sequence slot j of the mixed stream, and its draw count k.

    Domain choices are drawn i.i.d. ∝ weights in blocks of SLOT_BLOCK slots (block b from its own
    seeded generator). k (how many earlier slots chose the same domain) comes from per-block
    counts accumulated once, so looking up slot j costs O(1) after O(j / SLOT_BLOCK) setup.
    """

    def __init__(self, seed: int, probs: np.ndarray):
        self.seed = seed
        self.probs = probs
        self._before: list[np.ndarray] = [np.zeros(len(probs), dtype=np.int64)]
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b in self._blocks:
            return self._blocks[b]
        if len(self._blocks) > 4:
            self._blocks.clear()
        choice = _rng(self.seed, 2, b).choice(len(self.probs), size=SLOT_BLOCK, p=self.probs)
        rank = np.empty(SLOT_BLOCK, dtype=np.int64)  # occurrence index of each slot's domain
        for d in range(len(self.probs)):
            where = np.flatnonzero(choice == d)
            rank[where] = np.arange(len(where))
        self._blocks[b] = (choice, rank)
        return choice, rank

    def slot(self, j: int) -> tuple[int, int]:
        b, r = divmod(j, SLOT_BLOCK)
        while len(self._before) <= b:
            nb = len(self._before) - 1
            counts = np.bincount(self._block(nb)[0], minlength=len(self.probs))
            self._before.append(self._before[-1] + counts)
        choice, rank = self._block(b)
        d = int(choice[r])
        return d, int(self._before[b][d] + rank[r])


def mixture_probs(cfg: DataConfig) -> np.ndarray:
    """Mixture weights over `cfg.domains`, normalised; empty weights = uniform.

    A domain missing from a non-empty `weights` gets weight 0 (it is evaluated but not trained).
    """
    if not cfg.weights:
        return np.full(len(cfg.domains), 1.0 / len(cfg.domains))
    w = np.array([float(cfg.weights.get(d, 0.0)) for d in cfg.domains])
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError("data.weights must be non-negative with a positive sum over "
                          "data.domains")
    return w / w.sum()


class TrainBatches(IterableDataset):
    """Infinite training batches; batch i is a pure function of (seed, i).

    Yields whole batches (use `DataLoader(batch_size=None)`). With workers or distributed ranks,
    batch indices are dealt round-robin, so the DataLoader's own round-robin over workers gives
    batches back in order.
    """

    def __init__(self, seqs: dict[int, PackedSequences], train_ids: list[int], stream: str,
                 probs: np.ndarray, batch_size: int, seed: int,
                 byte_lengths: np.ndarray | None = None, start_step: int = 0):
        for d in train_ids:
            if len(seqs[d]) == 0:
                raise ConfigError(f"data: domain id {d} has no training sequences (corpus "
                                  "smaller than one sequence; lower data.seq_len)")
        self.seqs = seqs
        self.train_ids = train_ids
        self.stream = stream
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.slots = MixedSlots(seed, probs) if stream == "mixed" else None

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        B = self.batch_size
        picks: list[tuple[int, int]] = []  # (domain id, draw count)
        if self.stream == "mixed":
            for j in range(i * B, (i + 1) * B):
                local, k = self.slots.slot(j)
                picks.append((self.train_ids[local], k))
        elif self.stream == "separate":
            picks = [(self.train_ids[0], k) for k in range(i * B, (i + 1) * B)]
        else:  # per_domain: B sequences of each domain, grouped by domain
            picks = [(d, k) for d in self.train_ids for k in range(i * B, (i + 1) * B)]
        seqs = [self.seqs[d].item(draw_index(self.seed, d, k, len(self.seqs[d])))
                for d, k in picks]
        return make_batch(seqs, [d for d, _ in picks])

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        step = self.start_step + worker
        while True:
            yield self.batch(step * world + rank)
            step += n_workers


class HeldoutSequences(Dataset):
    """Held-out sequences of one domain in stream order (deterministic, no shuffle)."""

    def __init__(self, seqs: PackedSequences, limit: int | None = None):
        self.seqs = seqs
        self.n = len(seqs) if limit is None else min(limit, len(seqs))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        x, y, b = self.seqs.item(i)
        return x, y, self.seqs.domain_id, b


class CollateHeldout:
    """Collate (input, target, domain, target bytes) items into a batch dict (a class: workers
    pickle it)."""

    def __init__(self, byte_lengths: np.ndarray | None = None):
        self.table = None if byte_lengths is None else torch.as_tensor(byte_lengths)

    def __call__(self, items: list[tuple]) -> dict:
        return make_batch([(it[0], it[1], *it[3:]) for it in items], [it[2] for it in items],
                          self.table)
