"""A TEST DOUBLE of ai-toolkit's `run.py` (checked against the real one at commit 27a03a91 on a tiny klein): it
follows ai-toolkit's file and log conventions without training anything: tqdm progress on stderr, redrawn with
carriage returns; `{training_folder}/{name}/{name}_{step:09d}.safetensors` checkpoints and the final
`{name}.safetensors`; resume from the newest file, failing on every start when that one is cut off, as the real
trainer does. Config names ending in -oom or -nomodel make it fail the way ai-toolkit does; -truncate leaves its
second checkpoint cut off, as a kill during a save would."""

import sys
import time
from pathlib import Path

import yaml


def safetensors_bytes() -> bytes:
    """A real (tiny) .safetensors file: little-endian header length, JSON header, data."""
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    return len(header).to_bytes(8, "little") + header + bytes(4)


config = yaml.safe_load(Path(sys.argv[1]).read_text())
name = config["config"]["name"]
process = config["config"]["process"][0]
steps, every = process["train"]["steps"], process["save"]["save_every"]
folder = Path(process["training_folder"]) / name
folder.mkdir(parents=True, exist_ok=True)
if name.endswith("-nomodel"):
    print(f"huggingface_hub.errors.LocalEntryNotFoundError: {process['model']['name_or_path']}", file=sys.stderr)
    sys.exit(1)
saved = sorted(folder.glob(f"{name}*.safetensors"), key=lambda p: p.stat().st_mtime)
start = 0
if saved:
    newest = saved[-1]
    if newest.read_bytes() != safetensors_bytes():
        print("SafetensorError: Error while deserializing header: invalid header length", file=sys.stderr)
        sys.exit(1)
    start = steps if newest.name == f"{name}.safetensors" else int(newest.stem.rsplit("_", 1)[1])
for step in range(start + 1, steps + 1):
    loss = 1.0 / step
    bar = f"{name}:  {100 * step // steps}%|###| {step}/{steps}"
    sys.stderr.write(f"\r{bar} [00:01<00:02, 9.9it/s, lr: 1.0e-04 loss: {loss:.3e}]")
    sys.stderr.flush()
    if name.endswith("-oom") and step == 3:
        print("\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)
    if step % every == 0 and step < steps:  # as ai-toolkit: the last step is saved as the final file only
        whole = safetensors_bytes()
        cut = name.endswith("-truncate") and step == 2 * every  # a save cut off by a kill, under the final name
        (folder / f"{name}_{step:09d}.safetensors").write_bytes(whole[:20] if cut else whole)
        if cut:
            time.sleep(30)  # hangs, as a save that is being killed; the launcher's stop interrupts it
    time.sleep(0.002)
(folder / f"{name}.safetensors").write_bytes(safetensors_bytes())
