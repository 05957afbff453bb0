"""What writing a merge costs, on one CPU thread and one disk, each variant alternated with the others in one process.

- The end of each merged chunk: the finiteness check (a sum: engine._finite; min and max) and the rounding into the
  output (straight in: engine._write; a rounded copy copied in).
- A 1.1 GB shard written a tensor at a time and synced: plain; through the cache with each 32 MB handed to the disk
  as written (shard_file.CachedFile, where O_DIRECT is refused); pages dropped once written (a way not taken);
  O_DIRECT through a staging buffer (shard_file.DirectFile, skipped where the file system refuses it); and how long
  the shard then takes to read back. Each shard is removed once read back, so the next one written through the
  cache takes the pages it freed; with --keep every shard stays until the end, so each takes pages not used since the
  run began (on a virtual machine whose host takes back free memory, the slow case).

    python benchmarks/write_path.py [--repeats 2000] [--rounds 3] [--keep] [--folder /tmp/shoal-bench/write-path]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads

import torch  # noqa: E402

from mask_ops import per_entry  # noqa: E402

from shoal.checkpoint import shard_file  # noqa: E402
from shoal.merge import methods  # noqa: E402

SHARD = 1100 * 1024**2
PIECE = 12 * 1024**2  # one MLP matrix of the 0.55B benchmark model in bfloat16


def chunk_ends(repeats: int) -> None:
    torch.set_num_threads(1)
    values = torch.randn(methods.CHUNK)
    out = torch.empty(methods.CHUNK, dtype=torch.bfloat16)
    rows = {
        "check: sum (finite)": lambda: bool(torch.isfinite(values.sum())),
        "check: min and max": lambda: torch.aminmax(values),
        "round: into the output": lambda: out.copy_(values),
        "round: a copy, copied in": lambda: out.copy_(values.to(torch.bfloat16)),
    }
    for name, function in rows.items():
        print(f"{name:28s} {per_entry(function, methods.CHUNK, repeats):6.3f} ns an entry (one thread)")


def plain(path: Path, data: memoryview) -> None:
    with open(path, "wb") as file:
        for first in range(0, len(data), PIECE):
            file.write(data[first:first + PIECE])
        file.flush()
        os.fsync(file.fileno())


def in_pieces(file: shard_file.ShardFile, data: memoryview) -> None:
    try:
        for first in range(0, len(data), PIECE):
            file.write(data[first:first + PIECE])
    except BaseException:
        file.abort()
        raise
    file.close()


def dropped(path: Path, data: memoryview) -> None:
    window = 64 * 1024**2
    start = shard_file._START_WRITEBACK
    with open(path, "wb") as file:
        fd, done, gone = file.fileno(), 0, 0
        for first in range(0, len(data), PIECE):
            file.write(data[first:first + PIECE])
            file.flush()
            start(fd, done, file.tell() - done, 2)
            done = file.tell()
            if done - gone > 2 * window:
                start(fd, gone, window, 1 | 2 | 4)  # wait, write, wait: then the pages are clean
                os.posix_fadvise(fd, gone, window, os.POSIX_FADV_DONTNEED)
                gone += window
        os.fsync(fd)


def direct(path: Path, data: memoryview, stage: shard_file.Stage) -> None:
    file = shard_file.open_direct(path, stage)
    if file is None:
        raise OSError(f"{path}: this file system refuses O_DIRECT")
    in_pieces(file, data)


def read_back(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(16 * 1024**2):
            pass
    return time.perf_counter() - start


def shards(folder: Path, rounds: int, keep: bool) -> None:
    if shard_file._START_WRITEBACK is None:
        print("no sync_file_range here: the shard comparison is Linux's")
        return
    folder.mkdir(parents=True, exist_ok=True)
    data = memoryview(torch.ones(SHARD // 2, dtype=torch.bfloat16).view(torch.uint8).numpy())
    stage = shard_file.Stage()
    ways = {"plain write, then fsync": lambda p: plain(p, data),
            "cache, each 32 MB handed over": lambda p: in_pieces(shard_file.CachedFile(p), data),
            "pages dropped once written": lambda p: dropped(p, data),
            "O_DIRECT, 16 MiB stage (shoal)": lambda p: direct(p, data, stage)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    reads: dict[str, list[float]] = {name: [] for name in ways}
    kept: list[Path] = []
    for round_ in range(rounds):
        for name, write in ways.items():
            path = folder / f"shard-{round_}-{len(seconds[name])}-{len(kept)}"
            start = time.perf_counter()
            try:
                write(path)
            except OSError as error:  # O_DIRECT on a file system without it (tmpfs before Linux 6.6)
                print(f"{name}: {error}; skipped")
                path.unlink(missing_ok=True)
                continue
            seconds[name].append(time.perf_counter() - start)
            reads[name].append(read_back(path))
            if keep:
                kept.append(path)
            else:
                path.unlink()
    for path in kept:
        path.unlink()
    stage.release()
    print(f"each shard {'kept to the end' if keep else 'removed once read back'}:")
    for name in (name for name in ways if seconds[name]):
        print(f"{name:30s} write + fsync {statistics.median(seconds[name]):5.2f} s "
              f"({min(seconds[name]):.2f}-{max(seconds[name]):.2f}), read back after "
              f"{statistics.median(reads[name]):5.2f} s (median of {rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep each shard to the end (fresh pages each write)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/shoal-bench/write-path"))
    args = parser.parse_args()
    chunk_ends(args.repeats)
    shards(args.folder, args.rounds, args.keep)


if __name__ == "__main__":
    main()
