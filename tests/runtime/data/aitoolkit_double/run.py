"""A TEST DOUBLE of ai-toolkit's `run.py`: it follows ai-toolkit's file and log conventions (tqdm progress redrawn
with carriage returns, `{training_folder}/{name}/{name}_{step:09d}.safetensors` checkpoints, resume from the newest
one) without training anything. Config names ending in -oom or -nomodel make it fail the way ai-toolkit does;
-truncate leaves its second checkpoint cut off, as a kill during a save would."""

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
    print(f"OSError: {process['model']['name_or_path']} is not a local folder and is not a valid model identifier")
    sys.exit(1)
done = sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob(f"{name}_*.safetensors"))
start = done[-1] if done else 0
for step in range(start + 1, steps + 1):
    loss = 1.0 / step
    bar = f"{name}:  {100 * step // steps}%|###| {step}/{steps}"
    sys.stdout.write(f"\r{bar} [00:01<00:02, 9.9it/s, lr: 1.0e-04 loss: {loss:.3e}]")
    sys.stdout.flush()
    if name.endswith("-oom") and step == 3:
        print("\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        sys.exit(1)
    if step % every == 0 and step < steps:  # as ai-toolkit: the last step is saved as the final file only
        whole = safetensors_bytes()
        cut = name.endswith("-truncate") and step == 2 * every  # a save cut off by a kill, under the final name
        (folder / f"{name}_{step:09d}.safetensors").write_bytes(whole[:20] if cut else whole)
        if cut:
            time.sleep(30)  # hangs, as a save that is being killed; the launcher's stop interrupts it
    time.sleep(0.002)
(folder / f"{name}.safetensors").write_bytes(safetensors_bytes())
print("\nDone")
