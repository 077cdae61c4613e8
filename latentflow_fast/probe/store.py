"""Incremental, resumable result storage: one Parquet shard per finished batch of probes.

A shard is written to a temporary name and renamed into place, so an interrupted sweep leaves only whole
shards. On restart the store reads the keys already present and the sweep skips them: nothing is lost and
nothing is written twice. Each rank of a distributed sweep writes its own shards (`part-r{rank}-...`).
`manifest.json` records the sweep's configuration fingerprint (see latentflow_fast.fingerprint: model weights,
clip contents, prompts, sampler and engine settings); reopening the folder with another configuration is
refused, naming the differing fields, instead of mixing incompatible results.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

SHARD_PATTERN = re.compile(r"part-r(\d+)-(\d+)\.parquet$")
KEY_COLUMNS = ("clip_id", "probe_id")


class ResultStore:
    def __init__(self, path, rank: Optional[int] = None, fingerprint: Optional[dict] = None):
        from .distributed import rank as current_rank

        self.path = Path(path)
        self.rank = current_rank() if rank is None else int(rank)
        self.path.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None:
            self._check_manifest(fingerprint)
        self._next_seq = 1 + max((seq for r, seq in self._shard_ids() if r == self.rank), default=-1)

    # ------------------------------------------------------------------ manifest
    def _check_manifest(self, fingerprint: dict) -> None:
        # Refused (naming the differing fields) when the folder holds shards made with another
        # configuration; a manifest next to no shards (a run that failed early) is simply replaced.
        from ..fingerprint import check_manifest

        check_manifest(self.path / "manifest.json", fingerprint, has_results=lambda: bool(self.shard_paths()),
                       write=self.rank == 0)

    # ------------------------------------------------------------------ shards
    def _shard_ids(self):
        for p in self.path.glob("part-r*.parquet"):
            m = SHARD_PATTERN.search(p.name)
            if m:
                yield int(m.group(1)), int(m.group(2))

    def shard_paths(self) -> list[Path]:
        return sorted(p for p in self.path.glob("part-r*.parquet") if SHARD_PATTERN.search(p.name))

    def done_keys(self) -> set:
        """(clip_id, probe_id) of every row already stored, by any rank."""
        keys = set()
        for p in self.shard_paths():
            frame = pd.read_parquet(p, columns=list(KEY_COLUMNS))
            keys.update(zip(frame["clip_id"], frame["probe_id"]))
        return keys

    def write(self, rows: Iterable[dict]) -> Optional[Path]:
        """Store rows that every rank computed identically (replicated work): under torch.distributed only
        rank 0 writes them, and all ranks wait until they are on disk. Alone, it just writes a shard."""
        from . import distributed

        info = distributed.current()
        if info is None or info.world_size == 1:
            return self.write_shard(rows)
        path = self.write_shard(rows) if info.rank == 0 else None
        distributed.barrier()
        return path

    def write_shard(self, rows: Iterable[dict]) -> Optional[Path]:
        """Store rows that this rank alone computed (its share of a sharded sweep) as one new shard."""
        rows = list(rows)
        if not rows:
            return None
        frame = pd.DataFrame(rows)
        final = self.path / f"part-r{self.rank:03d}-{self._next_seq:06d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, final)  # atomic: a reader never sees half a shard
        self._next_seq += 1
        return final

    def load(self) -> pd.DataFrame:
        """All stored rows, one per (clip_id, probe_id), in a stable order."""
        paths = self.shard_paths()
        if not paths:
            return pd.DataFrame()
        frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
        duplicated = frame.duplicated(list(KEY_COLUMNS))
        if duplicated.any():
            raise RuntimeError(f"{int(duplicated.sum())} duplicated result rows in {self.path}")
        return frame.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)
