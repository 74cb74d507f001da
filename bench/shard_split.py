"""Split throughput and peak memory against a plain copy of the same bytes, in the same run.

Writes Mixtral-shaped checkpoints (real HF layout: config.json, sharded safetensors with an
index) of about --size-gb and twice that, then for each: a plain copy of its files (with fsync,
as the split does), and `shard_tool split` in a child process whose peak RSS (VmHWM) is read
from /proc while it runs. Prints times, the split/copy ratio and peak RSS as a share of the
model. --src splits an existing checkpoint instead (e.g. testbed/data/tiny-mixtral: a 16-bit
split never imports torch, so its peak is the interpreter's plus a copy buffer).

    .venv/bin/python bench/shard_split.py [--size-gb 1.5] [--dtype keep|bfloat16] [--dir DIR]
    .venv/bin/python bench/shard_split.py --src testbed/data/tiny-mixtral
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from shard_tool.families import MIXTRAL
from shard_tool.safetensors_io import DTYPE_BYTES, StreamingWriter

HIDDEN, FFN, EXPERTS, VOCAB, HEADS, KV_HEADS = 1024, 3584, 8, 32000, 8, 2
FILL_CHUNK_BYTES = 16 * 1024 * 1024


def layer_count_for(size_bytes: float) -> int:
    per_layer = EXPERTS * 3 * HIDDEN * FFN * 2 + (2 * HIDDEN * HIDDEN + 2 * HIDDEN * 256) * 2
    return max(1, round((size_bytes - 2 * VOCAB * HIDDEN * 2) / per_layer))


def write_checkpoint(folder: str, layers: int, files: int = 4) -> int:
    """A bf16 Mixtral-shaped checkpoint of random bytes, `files` safetensors + index."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                           num_hidden_layers=layers, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, dtype="bfloat16")
    os.makedirs(folder)
    config.to_json_file(os.path.join(folder, "config.json"))
    shape = MIXTRAL.shape_from_config(config.to_dict())
    experts = {name: s for name, (s, _) in MIXTRAL.expected(shape).items()}
    import torch
    from transformers import MixtralForCausalLM

    with torch.device("meta"):  # the rest of the model, under its on-disk names
        model = MixtralForCausalLM(config)
    rest = {n.replace(".mlp.", ".block_sparse_moe."): tuple(t.shape)
            for n, t in model.state_dict().items() if ".experts." not in n}
    names = sorted({**rest, **experts}.items())
    fill = os.urandom(FILL_CHUNK_BYTES)
    weight_map, total = {}, 0
    per_file = -(-len(names) // files)
    for i in range(files):
        file_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        group = names[i * per_file:(i + 1) * per_file]
        writer = StreamingWriter(os.path.join(folder, file_name),
                                 [(n, "BF16", s) for n, s in group])
        for name, tensor_shape in group:
            nbytes = DTYPE_BYTES["BF16"]
            for d in tensor_shape:
                nbytes *= d
            chunks = (memoryview(fill)[: min(FILL_CHUNK_BYTES, nbytes - o)]
                      for o in range(0, nbytes, FILL_CHUNK_BYTES))
            writer.append_raw(name, chunks)
            weight_map[name] = file_name
        writer.close()
        total += writer.bytes_written
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def plain_copy(src: str, dst: str) -> float:
    os.sync()  # start clean: no writeback of earlier runs billed to this one
    start = time.perf_counter()
    os.makedirs(dst)
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, name), "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process. (wait4's ru_maxrss would carry over this parent's peak
    across fork+exec, so the child is sampled through /proc instead.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_sampled(argv: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of a command in its own process."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, peak_rss_bytes(proc.pid))
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return elapsed, peak


def timed_split(src: str, dst: str, dtype: str) -> tuple[float, int]:
    return run_sampled([sys.executable, "-m", "shard_tool", "split", src, dst, "--dtype", dtype])


def baseline_rss() -> int:
    """Peak RSS of the interpreter importing the CLI and sleeping: the floor of any run."""
    return run_sampled([sys.executable, "-c", "import shard_tool.cli, time; time.sleep(0.5)"])[1]


def measure(ckpt: str, scratch: str, dtype: str, repeat: int) -> tuple[float, float, int]:
    """Best copy and split seconds, and the split's worst peak RSS (bytes), of `repeat` runs."""
    copies, splits = [], []
    for _ in range(repeat):  # interleaved, so drift in the disk hits both alike
        # outputs are removed at once: 24 GB of page cache cannot hold them all
        copies.append(plain_copy(ckpt, os.path.join(scratch, "copy")))
        shutil.rmtree(os.path.join(scratch, "copy"))
        splits.append(timed_split(ckpt, os.path.join(scratch, "split"), dtype))
        shutil.rmtree(os.path.join(scratch, "split"))
    return min(copies), min(s[0] for s in splits), max(s[1] for s in splits)


def checkpoint_figures(ckpt: str) -> tuple[int, int]:
    """(bytes of its safetensors files, its layers) of an existing checkpoint."""
    size = sum(os.path.getsize(os.path.join(ckpt, name)) for name in os.listdir(ckpt)
               if name.endswith(".safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        return size, int(json.load(f).get("num_hidden_layers", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--dtype", default="keep")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--src", default=None,
                        help="split this checkpoint instead of writing two synthetic ones")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-split-", dir=args.dir)
    rows = []
    try:
        if args.src:
            rows.append((*checkpoint_figures(args.src),
                         *measure(args.src, scratch, args.dtype, args.repeat)))
        for factor in () if args.src else (1, 2):
            layers = layer_count_for(args.size_gb * factor * 1e9)
            ckpt = os.path.join(scratch, f"ckpt{factor}")
            size = write_checkpoint(ckpt, layers)
            rows.append((size, layers, *measure(ckpt, scratch, args.dtype, args.repeat)))
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    floor = baseline_rss()
    print(f"shard_tool split --dtype {args.dtype} vs plain copy (both fsync'd), best time of {args.repeat}, worst RSS")
    print(f"{'model':>9} {'layers':>6} {'copy s':>7} {'split s':>8} {'split/copy':>10} "
          f"{'peak RSS':>9} {'RSS/model':>9}")
    for size, layers, copy_s, split_s, rss in rows:
        print(f"{size / 1e9:>7.2f}GB {layers:>6} {copy_s:>7.2f} {split_s:>8.2f} "
              f"{split_s / copy_s:>9.2f}x {rss / 2**20:>7.0f}MB {100 * rss / size:>8.1f}%")
    if len(rows) > 1:
        print(f"peak RSS growth from {rows[0][0] / 1e9:.2f} to {rows[1][0] / 1e9:.2f} GB: "
              f"{(rows[1][4] - rows[0][4]) / 2**20:+.0f} MB")
    print(f"interpreter + CLI alone: {floor / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
