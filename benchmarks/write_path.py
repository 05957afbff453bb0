"""What writing a merge costs, on one CPU thread and one disk, each variant alternated with the others in one process.

- The end of each merged chunk: the finiteness check (a sum: engine._finite; min and max) and the rounding into the
  output (straight in: engine._write; a rounded copy copied in).
- A 1.1 GB shard written a tensor at a time and synced: plain; with each 32 MB handed to the disk as written
  (ModelFolderWriter); two ways not taken, pages dropped once written and O_DIRECT (skipped where the file system
  refuses it); and how long the shard then takes to read back.

    python benchmarks/write_path.py [--repeats 2000] [--rounds 3] [--folder /tmp/shoal-bench/write-path]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from pathlib import Path

from shoal.allocator import tune_for_merging

tune_for_merging()  # as the `shoal` command does, before torch loads

import torch  # noqa: E402

from mask_ops import per_entry  # noqa: E402

from shoal.checkpoint import writer  # noqa: E402
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


def plain(path: Path, data: memoryview, start=None) -> None:
    with open(path, "wb") as file:
        done = 0
        for first in range(0, len(data), PIECE):
            file.write(data[first:first + PIECE])
            if start is not None and file.tell() - done >= writer.WRITEBACK_STEP:
                file.flush()
                start(file.fileno(), done, file.tell() - done, 2)
                done = file.tell()
        file.flush()
        os.fsync(file.fileno())


def dropped(path: Path, data: memoryview) -> None:
    window = 64 * 1024**2
    with open(path, "wb") as file:
        fd, done, gone = file.fileno(), 0, 0
        for first in range(0, len(data), PIECE):
            file.write(data[first:first + PIECE])
            file.flush()
            writer._START_WRITEBACK(fd, done, file.tell() - done, 2)
            done = file.tell()
            if done - gone > 2 * window:
                writer._START_WRITEBACK(fd, gone, window, 1 | 2 | 4)  # wait, write, wait: then the pages are clean
                os.posix_fadvise(fd, gone, window, os.POSIX_FADV_DONTNEED)
                gone += window
        os.fsync(fd)


def direct(path: Path, data: memoryview) -> None:
    bounce = memoryview(mmap.mmap(-1, PIECE))  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for first in range(0, len(data), PIECE):
            piece = data[first:first + PIECE]
            bounce[:len(piece)] = piece
            os.write(fd, bounce[:-(-len(piece) // 4096) * 4096])
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_back(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.read(16 * 1024**2):
            pass
    return time.perf_counter() - start


def shards(folder: Path, rounds: int) -> None:
    if writer._START_WRITEBACK is None:
        print("no sync_file_range here: the shard comparison is Linux's")
        return
    folder.mkdir(parents=True, exist_ok=True)
    data = memoryview(torch.ones(SHARD // 2, dtype=torch.bfloat16).view(torch.uint8).numpy())
    ways = {"plain write, then fsync": lambda p: plain(p, data),
            "asked for each 32 MB (shoal)": lambda p: plain(p, data, writer._START_WRITEBACK),
            "pages dropped once written": lambda p: dropped(p, data),
            "O_DIRECT": lambda p: direct(p, data)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    reads: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(rounds):
        for name, write in ways.items():
            path = folder / f"shard-{round_}-{len(seconds[name])}"
            start = time.perf_counter()
            try:
                write(path)
            except OSError as error:  # O_DIRECT on a file system without it (tmpfs): EINVAL
                print(f"{name}: {error}; skipped")
                path.unlink(missing_ok=True)
                continue
            seconds[name].append(time.perf_counter() - start)
            reads[name].append(read_back(path))
            path.unlink()
    for name in (name for name in ways if seconds[name]):
        print(f"{name:30s} write + fsync {statistics.median(seconds[name]):5.2f} s "
              f"({min(seconds[name]):.2f}-{max(seconds[name]):.2f}), read back after "
              f"{statistics.median(reads[name]):5.2f} s (median of {rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/shoal-bench/write-path"))
    args = parser.parse_args()
    chunk_ends(args.repeats)
    shards(args.folder, args.rounds)


if __name__ == "__main__":
    main()
